"""`simulate`: the Klaviyo calls the pipeline would make for each event, without sending anything.

port.md §3. No Beam and no network: the same planner and identify-state decision the pipeline
uses, run in order over JSON lines, with the identify state carried across the lines of one run.

The input is cut into lines exactly as the pipeline cuts files (`transforms.lines`): bytes split
on `\n` or `\r\n` (a bare `\r` is not a separator), a leading UTF-8 BOM dropped, nothing
decoded before the parse. So a line that is not UTF-8 is an `invalid_event` record, not a
crash, and blank lines are skipped: one record per non-blank line. Output lines are written by
`transforms.lines.to_json_line`, which escapes what UTF-8 cannot hold (a lone surrogate
from a `"\ud800"` escape).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TextIO

import orjson

from transforms.elements import Envelope, PlannedEvent, outgoing
from transforms.klaviyo.identify_state import (
    DEFAULT_MAX_SKEW_SECONDS,
    IdentifyState,
    Verdict,
    decide,
    ordering_time,
)
from transforms.klaviyo.plan import Call, EventPlan, Planner
from transforms.lines import Readable, event_lines, finite_and_static, to_json_line


class Simulation:
    """A planner plus the per-profile identify state of one run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.planner = Planner(config)
        self.states: dict[str, IdentifyState] = {}
        self._finite_config = finite_and_static(config)

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

    def step_json(self, raw: bytes | str, now_ms: float | None = None) -> str:
        """`step` for one line of JSON, written as one line of JSON.

        A record can hold a number JSON cannot write (Infinity, NaN: `json.dumps` writes them,
        orjson writes null) only if one came in through the event or the config. orjson's decoder
        refuses such numbers, so an event it decodes (handed to the planner decoded) under a
        config without them and without callbacks gets the fast writer; any other line is
        planned from its text and written by `to_json_line`.
        """
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return to_json_line(self.step(raw, now_ms))
        record = self.step(event if event.__class__ is dict else raw, now_ms)
        return to_json_line(record, finite=self._finite_config)


def simulate(config: dict[str, Any], source: Readable) -> Iterator[dict[str, Any]]:
    """One output record per non-blank line of a binary input, in order."""
    simulation = Simulation(config)
    for line in event_lines(source):
        yield simulation.step(line)


def write_simulation(config: dict[str, Any], source: Readable, out: TextIO) -> None:
    """`walkeros-klaviyo simulate`: the records of `simulate` as JSON Lines on `out`."""
    simulation = Simulation(config)
    write = out.write
    for line in event_lines(source):
        write(simulation.step_json(line) + "\n")
