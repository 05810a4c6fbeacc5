"""Dead letters: every input that cannot be delivered, with its original payload and the reason.

port.md D9. Each stage routes its failures to the tagged output `DEAD_LETTERS` as a
`DeadLetterRecord` naming the stage (the stage names are the module names and the metric names:
`dead_letters_<stage>`). They are written as one JSON object per record, to files or to a
Pub/Sub topic (where the message data is that JSON, and the attribute `stage` lets a subscription
filter by stage):

    {"stage": "parse", "reason": "invalid JSON at line 1 column 1: Expecting value",
     "time": "2026-11-28T12:00:00.000Z", "event_id": null, "message_id": "1234",
     "publish_time": "2026-11-28T11:59:59.870Z", "attributes": {"src": "web"},
     "ordering_key": null, "payload": "not json", "payload_encoding": "utf-8", "call": null,
     "truncated": null}

`payload` is the original message text, or its base64 when it is not UTF-8
(`"payload_encoding": "base64"`); `call` is the Klaviyo call (`{"method", "body"}`) that failed
for the preflight and sink stages; `ordering_key` is the Pub/Sub ordering key the message was
published with (a replay publishes with it again); `publish_time` is the message's publish time,
or for a line of a file that reached the plan stage the processing time it was planned at (the
plan stage keeps it in the envelope: a replay plans the time the first run planned).

A record always fits where it goes: Pub/Sub refuses message data over 10,000,000 bytes (and a
publish request over 10 MB), so a record is at most `MAX_RECORD_BYTES` of JSON, for files too
(whatever is in them may be replayed to Pub/Sub). A bigger one is cut: first the call's body, then
the payload, then an event id that is a string, each replaced by its first bytes (the body as its
JSON text in a string), and `truncated` names what was cut: `{"call": {…}, "payload":
{"bytes": size, "sha256": hex digest, "kept_bytes": n, "reason": …}}`. A truncated payload cannot
be replayed; its digest identifies the original.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, WriteToPubSub
from apache_beam.pvalue import TaggedOutput

from transforms.elements import Envelope
from transforms.json_lines import WriteJsonLines
from transforms.klaviyo.plan import Call
from transforms.klaviyo.wire import iso_time
from transforms.lines import to_json_line
from transforms.metrics import counter, dead_letter_counter_name

DEAD_LETTERS = "dead_letters"

# The stages, in the order an event passes them.
PARSE = "parse"
PLAN = "plan"
IDENTIFY_STATE = "identify_state"
PREFLIGHT = "preflight"
SINK = "sink"
STAGES = (PARSE, PLAN, IDENTIFY_STATE, PREFLIGHT, SINK)

# 1 MB under Pub/Sub's 10,000,000-byte data limit: room for the `stage` attribute and the
# publish request around the message.
MAX_RECORD_BYTES = 9_000_000
MAX_REASON_CHARS = 4_000

log = logging.getLogger(__name__)


def _size(record: dict[str, Any]) -> int:
    return len(to_json_line(record).encode("utf-8"))


def _text_prefix(raw: bytes, keep: int) -> str:
    """The first `keep` bytes of UTF-8 text, without a character cut in half."""
    return raw[:keep].decode("utf-8", "ignore")


def _base64_prefix(raw: bytes, keep: int) -> str:
    return base64.b64encode(raw[:keep]).decode("ascii")


def _cut(record: dict[str, Any], field: str, raw: bytes, prefix: Callable[[bytes, int], str],
         limit: int) -> dict[str, Any]:
    """`record` with `field` (`payload`, `event_id`, or `call` for its body) holding as much of
    `raw` as fits in `limit`, and the cut described under `truncated`."""
    size = original = _size(record)
    keep = len(raw)
    cut = dict(record)
    while size > limit and keep > 0:
        keep = max(0, keep - (size - limit) - 64)  # escaping only makes the cut go faster
        if field == "call":
            cut["call"] = {**record["call"], "body": prefix(raw, keep)}
        else:
            cut[field] = prefix(raw, keep)
        cut["truncated"] = {**(record["truncated"] or {}), field: {
            "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest(), "kept_bytes": keep,
            "reason": f"the dead letter was {original} bytes of JSON, over the "
                      f"{limit}-byte limit that keeps it within Pub/Sub's 10 MB messages"}}
        size = _size(cut)
    return cut


@dataclass(frozen=True)
class DeadLetterRecord:
    """An input that will not be delivered (or one of its calls), and why."""

    stage: str
    reason: str
    time_ms: float
    envelope: Envelope
    event_id: Any = None
    call: Call | None = None

    def to_json(self, limit: int = MAX_RECORD_BYTES) -> dict[str, Any]:
        """The record as written, within `limit` bytes of JSON (module docstring)."""
        envelope = self.envelope
        prefix: Callable[[bytes, int], str]
        try:
            payload, encoding, prefix = envelope.payload.decode("utf-8"), "utf-8", _text_prefix
        except UnicodeDecodeError:
            payload, encoding, prefix = _base64_prefix(envelope.payload, len(envelope.payload)), \
                "base64", _base64_prefix
        publish_time = envelope.publish_time_ms
        reason = self.reason
        if len(reason) > MAX_REASON_CHARS:
            reason = f"{reason[:MAX_REASON_CHARS]}… ({len(reason)} characters)"
        record = {
            "stage": self.stage,
            "reason": reason,
            "time": iso_time(self.time_ms),
            "event_id": self.event_id,
            "message_id": envelope.message_id,
            "publish_time": None if publish_time is None else iso_time(publish_time),
            "attributes": envelope.attributes,
            "ordering_key": envelope.ordering_key,
            "payload": payload,
            "payload_encoding": encoding,
            "call": None if self.call is None else {"method": self.call.method,
                                                     "body": self.call.body},
            "truncated": None,
        }
        if _size(record) <= limit:
            return record
        if self.call is not None:
            body = to_json_line(self.call.body).encode("utf-8")
            record = _cut(record, "call", body, _text_prefix, limit)
        record = _cut(record, "payload", envelope.payload, prefix, limit)
        if isinstance(self.event_id, str):  # an event's own id can be any length
            record = _cut(record, "event_id", self.event_id.encode("utf-8", "surrogatepass"),
                          _text_prefix, limit)
        return record

    def to_pubsub(self) -> PubsubMessage:
        return PubsubMessage(to_json_line(self.to_json()).encode("utf-8"), {"stage": self.stage})


def dead_letter(envelope: Envelope, stage: str, reason: str, *, event_id: Any = None,
                call: Call | None = None) -> TaggedOutput:
    """The tagged output a DoFn yields for a failure at `stage`."""
    record = DeadLetterRecord(stage, reason, time.time() * 1000, envelope, event_id, call)
    return TaggedOutput(DEAD_LETTERS, record)


def unexpected(stage: str, envelope: Envelope, error: Exception) -> TaggedOutput:
    """A dead letter for an exception nobody expected (a bug, or a resource limit such as a
    payload nested too deeply). Raising instead would make a streaming runner retry the bundle
    for ever and stall the pipeline; the record and the log keep the bug visible."""
    log.exception("unexpected failure at stage %s", stage)
    return dead_letter(envelope, stage, f"unexpected {type(error).__name__}: {error}")


def _count(record: DeadLetterRecord) -> DeadLetterRecord:
    counter(dead_letter_counter_name(record.stage)).inc()
    return record


def _as_json(record: DeadLetterRecord) -> tuple[dict[str, Any]]:
    return (record.to_json(),)


class WriteDeadLetters(beam.PTransform):
    """Counts dead letters by stage and writes them to a Pub/Sub topic and/or files."""

    def __init__(self, *, topic: str | None, path: str | None, streaming: bool,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        if not topic and not path:
            raise ValueError("dead letters need a topic or a path")
        self.topic = topic
        self.path = path
        self.streaming = streaming
        self.clock = clock  # stamps streaming file lines (transforms/json_lines.py)

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        counted = records | "count" >> beam.Map(_count)
        if self.topic:
            (counted
             | "to_pubsub" >> beam.Map(DeadLetterRecord.to_pubsub)
             | "publish" >> WriteToPubSub(self.topic, with_attributes=True))
        if self.path:
            counted | "write" >> WriteJsonLines(self.path, streaming=self.streaming,
                                                to_values=_as_json, clock=self.clock)
        return beam.pvalue.PDone(records.pipeline)
