"""Dead letters: every input that cannot be delivered, with its original payload and the reason.

port.md D9. Each stage routes its failures to the tagged output `DEAD_LETTERS` as a
`DeadLetterRecord` naming the stage (the stage names are the module names and the metric names:
`dead_letters_<stage>`). They are written as one JSON object per record, to files or to a
Pub/Sub topic (where the message data is that JSON, and the attribute `stage` lets a subscription
filter by stage):

    {"stage": "parse", "reason": "invalid JSON at line 1 column 1: Expecting value",
     "time": "2026-11-28T12:00:00.000Z", "event_id": null, "message_id": "1234",
     "publish_time": "2026-11-28T11:59:59.870Z", "attributes": {"src": "web"},
     "payload": "not json", "payload_encoding": "utf-8", "call": null}

`payload` is the original message text, or its base64 when it is not UTF-8
(`"payload_encoding": "base64"`); `call` is the Klaviyo call (`{"method", "body"}`) that failed
for the preflight and sink stages.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, WriteToPubSub
from apache_beam.pvalue import TaggedOutput

from transforms.elements import Envelope
from transforms.json_lines import WriteJsonLines, to_json_line
from transforms.klaviyo.plan import Call
from transforms.klaviyo.wire import iso_time
from transforms.metrics import counter, dead_letter_counter_name

DEAD_LETTERS = "dead_letters"

# The stages, in the order an event passes them.
PARSE = "parse"
PLAN = "plan"
IDENTIFY_STATE = "identify_state"
PREFLIGHT = "preflight"
SINK = "sink"
STAGES = (PARSE, PLAN, IDENTIFY_STATE, PREFLIGHT, SINK)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetterRecord:
    """An input that will not be delivered (or one of its calls), and why."""

    stage: str
    reason: str
    time_ms: float
    envelope: Envelope
    event_id: Any = None
    call: Call | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written (module docstring)."""
        envelope = self.envelope
        try:
            payload, encoding = envelope.payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            payload, encoding = base64.b64encode(envelope.payload).decode("ascii"), "base64"
        publish_time = envelope.publish_time_ms
        return {
            "stage": self.stage,
            "reason": self.reason,
            "time": iso_time(self.time_ms),
            "event_id": self.event_id,
            "message_id": envelope.message_id,
            "publish_time": None if publish_time is None else iso_time(publish_time),
            "attributes": envelope.attributes,
            "payload": payload,
            "payload_encoding": encoding,
            "call": None if self.call is None else {"method": self.call.method,
                                                     "body": self.call.body},
        }

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


class WriteDeadLetters(beam.PTransform):
    """Counts dead letters by stage and writes them to a Pub/Sub topic and/or files."""

    def __init__(self, *, topic: str | None, path: str | None, streaming: bool) -> None:
        super().__init__()
        if not topic and not path:
            raise ValueError("dead letters need a topic or a path")
        self.topic = topic
        self.path = path
        self.streaming = streaming

    def expand(self, records: beam.PCollection) -> beam.pvalue.PDone:
        counted = records | "count" >> beam.Map(_count)
        if self.topic:
            (counted
             | "to_pubsub" >> beam.Map(DeadLetterRecord.to_pubsub)
             | "publish" >> WriteToPubSub(self.topic, with_attributes=True))
        if self.path:
            (counted
             | "to_json" >> beam.Map(DeadLetterRecord.to_json)
             | "write" >> WriteJsonLines(self.path, streaming=self.streaming))
        return beam.pvalue.PDone(records.pipeline)
