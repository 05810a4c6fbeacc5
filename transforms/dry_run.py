"""The dry-run sink: the calls that would be sent, as JSON Lines, instead of calling Klaviyo.

One line per call, in no particular order:

    {"event_id": "0002a1b2c3d4e5f6", "method": "create_or_update_profile", "body": {"data": …}}

`body` is the request body on the wire (port.md §3), as `simulate` prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam

from transforms.elements import OutgoingEvent
from transforms.json_lines import WriteJsonLines
from transforms.metrics import counter
from transforms.parts import Parts, as_parts


def dry_run_records(outgoing: OutgoingEvent) -> list[dict[str, Any]]:
    """The lines written for one event's calls (as a fresh sink would send them), each
    counted as `dry_run_calls`."""
    calls = outgoing.planned_calls()
    counter("dry_run_calls").inc(len(calls))
    return [{"event_id": outgoing.event_id, "method": call.method, "body": call.body}
            for call in calls]


class WriteDryRun(beam.PTransform):
    """Outgoing events (one PCollection or parts: transforms/parts.py) → JSON Lines at
    `destination` (`-` for stdout, or a file path prefix)."""

    def __init__(self, destination: str, *, streaming: bool,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.destination = destination
        self.streaming = streaming
        self.clock = clock  # stamps streaming file lines (transforms/json_lines.py)

    def expand(self, calls: beam.PCollection | Parts) -> beam.pvalue.PDone:
        parts = as_parts(calls)
        parts | "write" >> WriteJsonLines(self.destination, streaming=self.streaming,
                                          to_values=dry_run_records, clock=self.clock)
        return beam.pvalue.PDone(parts[0].pipeline)
