"""Stage `plan`: a walkerOS event → the Klaviyo calls it asks for (transforms/klaviyo/plan.py).

Consent-denied, ignored and no-identifier events are counted and dropped (port.md D8), and so is
an event that asks for no call (a silent rule without identify); an event that turns invalid
under the mapping (a non-numeric timestamp after `policy`) is a dead letter.

The DoFn gets the destination config as loaded at pipeline construction, not the file: `$env.`
references are resolved where the job is launched (workers have another environment), and
`$py:` callables travel pickled by reference, so their module must be installed on the workers,
just as it would have to be to import them there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.dead_letters import DEAD_LETTERS, PLAN, dead_letter, unexpected
from transforms.elements import Envelope, ParsedEvent, PlannedEvent
from transforms.klaviyo.plan import INVALID_EVENT, EventPlan, Planner
from transforms.metrics import counter

Clock = Callable[[], float]  # seconds since the epoch, like time.time


def route(envelope: Envelope, plan: EventPlan) -> Iterator[PlannedEvent | TaggedOutput]:
    """Count the plan's outcome and send it on: to the next stage, to the dead letters (an
    invalid event), or nowhere (a counted skip)."""
    if plan.skipped == INVALID_EVENT:
        counter("invalid").inc()
        yield dead_letter(envelope, PLAN, "; ".join(plan.warnings), event_id=plan.event_id)
        return
    if plan.skipped:
        counter(plan.skipped).inc()  # "ignored", "consent", "no_identifier"
        return
    if plan.warnings:
        counter("plan_warnings").inc(len(plan.warnings))
    if plan.event is None and plan.profile is None:  # a silent rule without identify
        counter("nothing_to_send").inc()
        return
    counter("events_planned" if plan.event is not None else "identify_only").inc()
    yield PlannedEvent(envelope, plan)


class _PlanFn(beam.DoFn):
    def __init__(self, config: dict[str, Any], clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._planner: Planner | None = None

    def setup(self) -> None:
        self._planner = Planner(self._config)

    def process(self, parsed: ParsedEvent) -> Iterator[PlannedEvent | TaggedOutput]:
        assert self._planner is not None, "setup() runs before process()"
        envelope = parsed.envelope
        now_ms = self._clock() * 1000
        if envelope.publish_time_ms is None:
            # A line of a file: the processing time stands in for a missing timestamp (D5).
            # Kept as the envelope's fallback time, it is the time every later stage and dead
            # letter sees, so a replay plans the event at the time it was planned at first.
            envelope = envelope.with_publish_time(now_ms)
        try:
            plan = self._planner.plan_event(parsed.event, now_ms=now_ms,
                                            message_id=envelope.message_id,
                                            publish_time_ms=envelope.publish_time_ms)
        except Exception as error:  # noqa: BLE001 - see dead_letters.unexpected
            yield unexpected(PLAN, envelope, error)
            return
        yield from route(envelope, plan)


class Plan(beam.PTransform):
    """Events → (planned events, dead letters)."""

    def __init__(self, config: dict[str, Any], *, clock: Clock = time.time) -> None:
        super().__init__()
        self.config = config
        self.clock = clock

    def expand(self, events: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        outputs = events | "plan" >> beam.ParDo(_PlanFn(self.config, self.clock)).with_outputs(
            DEAD_LETTERS, main="planned")
        return outputs.planned, outputs[DEAD_LETTERS]
