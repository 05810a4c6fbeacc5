"""`simulate`: the Klaviyo calls the pipeline would make for each event, without sending anything.

port.md §3. No Beam and no network: the same planner and identify-state decision the pipeline
uses, run in order over JSON lines, with the identify state carried across the lines of one run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from transforms.klaviyo.identify_state import IdentifyState, decide
from transforms.klaviyo.plan import Call, EventPlan, Planner


class Simulation:
    """A planner plus the per-profile identify state of one run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.planner = Planner(config)
        self.states: dict[str, IdentifyState] = {}
        self._finite_config = _finite_and_static(config)

    def send_profile(self, plan: EventPlan) -> bool:
        """The identify-state decision for this plan, updating the state (port.md D1)."""
        if plan.profile is None or plan.profile_key is None or plan.timestamp_ms is None:
            return False
        state, send = decide(self.states.get(plan.profile_key), plan.profile.body,
                             plan.timestamp_ms)
        self.states[plan.profile_key] = state
        return send

    def plan(self, raw: bytes | str | dict[str, Any], now_ms: float | None = None
             ) -> tuple[EventPlan, list[Call]]:
        """The plan for one event and the calls it makes after the identify decision."""
        plan = self.planner.plan(raw, now_ms=time.time() * 1000 if now_ms is None else now_ms)
        return plan, plan.calls(send_profile=self.send_profile(plan))

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
        planned from its text and written by `json.dumps`, as before.
        """
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return json.dumps(self.step(raw, now_ms), ensure_ascii=False)
        record = self.step(event if event.__class__ is dict else raw, now_ms)
        if self._finite_config:
            try:
                return orjson.dumps(record).decode()
            except TypeError:  # integers beyond 64 bits, lone surrogates
                pass
        return json.dumps(record, ensure_ascii=False)


def _finite_and_static(value: Any) -> bool:
    """No infinite or NaN number and no callable anywhere in a config value."""
    if isinstance(value, dict):
        return all(_finite_and_static(item) for item in value.values())
    if isinstance(value, list):
        return all(_finite_and_static(item) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return not callable(value)


def simulate(config: dict[str, Any], lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """One output record per input line, in order."""
    simulation = Simulation(config)
    for line in lines:
        yield simulation.step(line)
