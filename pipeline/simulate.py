"""`simulate`: the Klaviyo calls the pipeline would make for each event, without sending anything.

port.md §3. No Beam and no network: the same planner and identify-state decision the pipeline
uses, run in order over JSON lines, with the identify state carried across the lines of one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from transforms.elements import Envelope, PlannedEvent
from transforms.identify_state import outgoing
from transforms.klaviyo.identify_state import (
    DEFAULT_MAX_SKEW_SECONDS,
    IdentifyState,
    Verdict,
    decide,
    ordering_time,
)
from transforms.klaviyo.plan import Call, EventPlan, Planner


class Simulation:
    """A planner plus the per-profile identify state of one run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.planner = Planner(config)
        self.states: dict[str, IdentifyState] = {}

    def verdict(self, plan: EventPlan, order_ms: float | None) -> Verdict | None:
        """The identify-state verdict on this plan's upsert, updating the state (port.md D1;
        the reference time is the processing time: a JSON line has no publish time)."""
        if plan.profile is None or plan.profile_key is None or plan.timestamp_ms is None:
            return None
        state, verdict = decide(self.states.get(plan.profile_key), plan.profile.body, order_ms,
                                timestamp_ms=plan.timestamp_ms)
        self.states[plan.profile_key] = state
        return verdict

    def plan(self, raw: bytes | str | dict[str, Any], now_ms: float | None = None
             ) -> tuple[EventPlan, list[Call]]:
        """The plan for one event and the calls it makes after the identify decision, as the
        pipeline's identify_state stage plans them for a fresh sink."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        plan = self.planner.plan(raw, now_ms=now_ms)
        order_ms = None if plan.timestamp_ms is None else ordering_time(
            plan.timestamp_ms, now_ms, DEFAULT_MAX_SKEW_SECONDS * 1000)
        verdict = self.verdict(plan, order_ms)
        if verdict is None:
            return plan, plan.calls(send_profile=False)
        return plan, outgoing(PlannedEvent(Envelope(b""), plan), verdict, 0.0).planned_calls()

    def step(self, raw: bytes | str | dict[str, Any], now_ms: float | None = None
             ) -> dict[str, Any]:
        """One input event → one `simulate` output record."""
        plan, calls = self.plan(raw, now_ms)
        return {"event_id": plan.event_id,
                "calls": [[call.method, call.body] for call in calls],
                "skipped": plan.skipped,
                "problems": plan.problems}


def simulate(config: dict[str, Any], lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One output record per input line, in order."""
    simulation = Simulation(config)
    for line in lines:
        yield simulation.step(line)
