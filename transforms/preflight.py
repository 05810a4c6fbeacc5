"""Stage `preflight`: a call Klaviyo would reject (transforms/klaviyo/preflight.py) is a dead
letter before it is sent, so that it cannot fail a whole bulk request (port.md D6). The other
calls of the same event go on.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput

from transforms.dead_letters import DEAD_LETTERS, PREFLIGHT, dead_letter
from transforms.elements import OutgoingCall


def _check(outgoing: OutgoingCall) -> Iterator[OutgoingCall | TaggedOutput]:
    call = outgoing.call
    if call.problems:
        reason = f"{call.method}: {'; '.join(call.problems)}"
        yield dead_letter(outgoing.envelope, PREFLIGHT, reason, event_id=outgoing.event_id,
                          call=call)
    else:
        yield outgoing


class Preflight(beam.PTransform):
    """Outgoing calls → (calls to send, dead letters)."""

    def expand(self, calls: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        outputs = calls | "check" >> beam.FlatMap(_check).with_outputs(DEAD_LETTERS, main="ok")
        return outputs.ok, outputs[DEAD_LETTERS]
