"""The explicit coders of what crosses a shuffle or waits in state (elements.py encodes).

Registered for their classes, so that a PCollection typed `PlannedEvent` or `OutgoingEvent`
(`with_output_types`) is encoded by these rather than pickled: compact, and independent of how a
Python class pickles, which a Dataflow `--update` would otherwise depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apache_beam as beam

from transforms.elements import (
    OutgoingEvent,
    PlannedEvent,
    decode_outgoing,
    decode_planned,
    encode_outgoing,
    encode_planned,
)


class _ElementCoder(beam.coders.Coder):
    """An element class's coder from its encode and decode functions (elements.py)."""

    encoder: Callable[[Any], bytes]
    decoder: Callable[[bytes], Any]

    def encode(self, value: Any) -> bytes:
        return type(self).encoder(value)

    def decode(self, encoded: bytes) -> Any:
        return type(self).decoder(encoded)

    def is_deterministic(self) -> bool:
        return True


class PlannedEventCoder(_ElementCoder):
    """The identify state's input (elements.encode_planned)."""

    encoder = staticmethod(encode_planned)
    decoder = staticmethod(decode_planned)


class OutgoingEventCoder(_ElementCoder):
    """The sink's input and the identify state's output (elements.encode_outgoing)."""

    encoder = staticmethod(encode_outgoing)
    decoder = staticmethod(decode_outgoing)


beam.coders.registry.register_coder(PlannedEvent, PlannedEventCoder)
beam.coders.registry.register_coder(OutgoingEvent, OutgoingEventCoder)
