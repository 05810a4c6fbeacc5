"""Stage `preflight`: a call Klaviyo would reject (transforms/klaviyo/preflight.py) is a dead
letter before it is sent, so that it cannot fail a whole bulk request (port.md D6). The other
call of the same event goes on.

A hint (an unchanged upsert, transforms/klaviyo/identify_state.py) with problems is dropped
without a dead letter: the equal body it repeats was dead-lettered here already.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.dead_letters import DEAD_LETTERS, PREFLIGHT, dead_letter
from transforms.elements import OutgoingEvent
from transforms.klaviyo.plan import Call
from transforms.parts import Parts, as_parts, label


def _problem(outgoing: OutgoingEvent, call: Call) -> TaggedOutput:
    reason = f"{call.method}: {'; '.join(call.problems)}"
    return dead_letter(outgoing.envelope, PREFLIGHT, reason, event_id=outgoing.event_id,
                       call=call)


def _check(outgoing: OutgoingEvent) -> Iterator[OutgoingEvent | TaggedOutput]:
    profile, event = outgoing.profile, outgoing.event
    if profile is not None and profile.problems:
        if outgoing.profile_changed:
            yield _problem(outgoing, profile)
        profile = None
    if event is not None and event.problems:
        yield _problem(outgoing, event)
        event = None
    if profile is outgoing.profile and event is outgoing.event:
        yield outgoing  # nothing dropped: no copy
    elif profile is not None or event is not None:
        yield dataclasses.replace(outgoing, profile=profile, event=event)


class Preflight(beam.PTransform):
    """Outgoing events (one PCollection or parts) → (events to send as parts, dead letters as
    parts), part by part (transforms/parts.py)."""

    def expand(self, calls: beam.PCollection | Parts) -> tuple[Parts, Parts]:
        ok, dead = [], []
        for index, part in enumerate(as_parts(calls)):
            outputs = part | label("check", index) >> beam.FlatMap(_check).with_output_types(
                OutgoingEvent).with_outputs(DEAD_LETTERS, main="ok")
            ok.append(outputs.ok)
            dead.append(outputs[DEAD_LETTERS])
        return tuple(ok), tuple(dead)
