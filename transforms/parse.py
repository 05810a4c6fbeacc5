"""Stage `parse`: a Pub/Sub message or a line of text → a valid walkerOS event, or a dead letter.

The message id and publish time are kept in the `Envelope`: the plan stage uses them as the
fallback event id (port.md D4) and event time (D5).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import orjson
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

from transforms.dead_letters import DEAD_LETTERS, PARSE, dead_letter, unexpected
from transforms.elements import Envelope, ParsedEvent
from transforms.metrics import counter
from transforms.walkeros.event import InvalidEvent, parse_event


def _milliseconds(publish_time: Any) -> float | None:
    """A Pub/Sub publish time in ms: client libraries give a datetime, Beam a Timestamp."""
    if isinstance(publish_time, datetime.datetime):
        return publish_time.timestamp() * 1000
    if isinstance(publish_time, Timestamp):
        return publish_time.micros / 1000
    return None


def envelope_of(element: PubsubMessage | bytes | str,
                timestamp: Timestamp = MIN_TIMESTAMP) -> Envelope:
    """The envelope of a Pub/Sub message (with attributes) or of one line of a file.

    A message without a publish time (a source that does not fill it in) gets its element
    timestamp, which a Pub/Sub source sets to the publish time."""
    if isinstance(element, PubsubMessage):
        published = _milliseconds(element.publish_time)
        if published is None and timestamp > MIN_TIMESTAMP:
            published = timestamp.micros / 1000
        return Envelope(element.data or b"", dict(element.attributes or {}),
                        element.message_id or None, published,
                        element.ordering_key or None)
    return Envelope(element.encode("utf-8", "surrogatepass") if isinstance(element, str)
                    else element)


MAPPED_PAYLOAD_HINT = ("the message looks like a mapped payload, not a walkerOS event; publish "
                       "whole events (see README 'Publishing from walkerOS')")


def with_hint(payload: bytes, reason: str) -> str:
    """`reason`, plus a hint when the payload is a JSON object without a `name`: what a
    walkerOS Pub/Sub destination publishes when a mapping's `data` replaces the event."""
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return reason
    if isinstance(decoded, dict) and "name" not in decoded:
        return f"{reason}: {MAPPED_PAYLOAD_HINT}"
    return reason


def _parsed(envelope: Envelope) -> Iterator[ParsedEvent | TaggedOutput]:
    counter("events_in").inc()
    try:
        parsed = parse_event(envelope.payload)
    except Exception as error:  # noqa: BLE001 - e.g. RecursionError on deep nesting
        yield unexpected(PARSE, envelope, error)
        return
    if isinstance(parsed, InvalidEvent):
        counter("invalid").inc()
        yield dead_letter(envelope, PARSE, with_hint(envelope.payload, parsed.reason))
    else:
        yield ParsedEvent(envelope, parsed)


class _ParseFn(beam.DoFn):
    """Pub/Sub messages (or records of unknown type): the element timestamp stands in for a
    missing publish time (`envelope_of`)."""

    def process(self, element: PubsubMessage | bytes | str,
                timestamp: Any = beam.DoFn.TimestampParam  # Any: see identify_state.py
                ) -> Iterator[ParsedEvent | TaggedOutput]:
        return _parsed(envelope_of(element, timestamp))


class _ParseLineFn(beam.DoFn):
    """Lines of files (a PCollection typed bytes or str): they have no publish time to fall
    back on, so no timestamp parameter either, and Beam calls the DoFn through its simple
    invoker (a DoFn asking for TimestampParam costs a parameter check per element)."""

    def process(self, line: bytes | str) -> Iterator[ParsedEvent | TaggedOutput]:
        return _parsed(envelope_of(line))


class Parse(beam.PTransform):
    """Messages → (events, dead letters)."""

    def expand(self, messages: beam.PCollection
               ) -> tuple[beam.PCollection, beam.PCollection]:
        parse = _ParseLineFn() if messages.element_type in (bytes, str) else _ParseFn()
        outputs = messages | "parse" >> beam.ParDo(parse).with_outputs(
            DEAD_LETTERS, main="events")
        return outputs.events, outputs[DEAD_LETTERS]
