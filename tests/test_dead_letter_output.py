"""Dead letters always fit where they go, keep the Pub/Sub ordering key, say when a message is a
mapped payload, and are never dropped as late in streaming file output."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue

from pipeline.assembly import PlanCalls
from transforms.dead_letters import MAX_RECORD_BYTES, DeadLetterRecord, WriteDeadLetters
from transforms.dry_run import WriteDryRun
from transforms.elements import Envelope
from transforms.klaviyo.plan import Call
from transforms.parse import MAPPED_PAYLOAD_HINT, envelope_of, with_hint
from transforms.walkeros.config import load_config_file

CONFIG = load_config_file(str(Path(__file__).parents[1] / "examples" / "flow.json")).config
T0 = 1_764_320_000  # seconds; 2025-11-28
FIVE_MB = "x" * 5_000_000


def _record(payload: bytes, call: Call | None = None, reason: str = "refused") -> DeadLetterRecord:
    return DeadLetterRecord("sink", reason, T0 * 1000.0,
                            Envelope(payload, {"src": "web"}, "m-1", None, "user-1"), "e-1", call)


def _published_size(record: DeadLetterRecord) -> int:
    """The size Beam's own Pub/Sub writer checks (it raises over 10 MB)."""
    return len(record.to_pubsub()._to_proto_str(for_publish=True))


def test_small_dead_letter_is_whole() -> None:
    record = _record(b'{"name": "order complete"}',
                     Call("create_event", {"data": {"type": "event"}})).to_json()
    assert record["truncated"] is None and record["ordering_key"] == "user-1"
    assert record["payload"] == '{"name": "order complete"}'
    assert record["call"] == {"method": "create_event", "body": {"data": {"type": "event"}}}


def test_big_call_is_cut_first_and_the_payload_kept() -> None:
    """The issue's case: a 5 MB mapped string is in the payload and in the call body."""
    payload = json.dumps({"name": "order complete", "data": {"note": FIVE_MB}}).encode()
    body = {"data": {"attributes": {"properties": {"note": FIVE_MB}}}}
    record = _record(payload, Call("create_event", body))
    written = record.to_json()
    assert len(json.dumps(written, separators=(",", ":")).encode()) <= MAX_RECORD_BYTES
    assert _published_size(record) <= 10_000_000
    assert written["payload"] == payload.decode()  # still replayable
    body_text = json.dumps(body, separators=(",", ":")).encode()
    cut = written["truncated"]["call"]
    assert cut["bytes"] == len(body_text)
    assert cut["sha256"] == hashlib.sha256(body_text).hexdigest()
    assert "10 MB" in cut["reason"]
    assert body_text.decode().startswith(written["call"]["body"])
    assert len(written["call"]["body"]) == cut["kept_bytes"]
    assert "payload" not in written["truncated"]


@pytest.mark.parametrize("payload", [
    b"\xff" * 9_000_000,  # base64 grows it by a third
    ('"' * 6_000_000).encode(),  # JSON escaping doubles it
    ("é" * 5_000_000).encode(),  # two bytes a character: a cut must not split one
])
def test_big_payload_is_cut_with_its_size_and_digest(payload: bytes) -> None:
    record = _record(payload)
    written = record.to_json()
    assert _published_size(record) <= 10_000_000
    cut = written["truncated"]["payload"]
    assert cut["bytes"] == len(payload) and cut["sha256"] == hashlib.sha256(payload).hexdigest()
    kept = (base64.b64decode(written["payload"]) if written["payload_encoding"] == "base64"
            else written["payload"].encode())
    assert payload.startswith(kept) and 0 < len(kept) <= cut["kept_bytes"]


def test_huge_event_id_is_cut_last() -> None:
    """Every field of an event can be any length, its id too; here the id alone is too big."""
    huge_id = "i" * 9_500_000
    payload = json.dumps({"name": "order complete", "id": huge_id}).encode()
    record = DeadLetterRecord("preflight", "refused", T0 * 1000.0, Envelope(payload), huge_id,
                              Call("create_event", {"unique_id": huge_id}))
    written = record.to_json()
    assert _published_size(record) <= 10_000_000
    assert set(written["truncated"]) == {"call", "payload", "event_id"}
    assert written["truncated"]["event_id"]["bytes"] == len(huge_id)
    assert huge_id.startswith(written["event_id"])


def test_long_reason_is_capped() -> None:
    written = _record(b"{}", reason="r" * 50_000).to_json()
    assert len(written["reason"]) < 4_100 and written["reason"].endswith("(50000 characters)")


def test_ordering_key_is_kept_from_the_message() -> None:
    message = PubsubMessage(b"{}", {"a": "b"}, message_id="m-9", ordering_key="u-9")
    envelope = envelope_of(message)
    assert envelope.ordering_key == "u-9"
    assert envelope_of(PubsubMessage(b"{}", {})).ordering_key is None


@pytest.mark.parametrize(("payload", "hinted"), [
    (b'{"order_id": "ORD-500", "revenue": 199.99}', True),  # the destination's mapped data
    (b'{"name": "order"}', False),  # a broken event: its name is the problem
    (b'["order complete"]', False),
    (b"not json", False),
])
def test_mapped_payload_hint(payload: bytes, hinted: bool) -> None:
    reason = with_hint(payload, "name must be a non-empty string 'entity action', got missing")
    assert (MAPPED_PAYLOAD_HINT in reason) is hinted
    assert reason.startswith("name must be")


def _read_lines(prefix: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(prefix.parent.glob(f"{prefix.name}*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_streaming_backlog_lines_are_not_dropped_as_late(tmp_path: Path) -> None:
    """A backlog: 30 old messages arrive when the watermark is already ten minutes past their
    publish times (the local reader's watermark is the wall clock). Stamped with their publish
    times, their 60 s windows would be closed and every line dropped as late."""
    event = {"name": "product view", "data": {"id": "a"}, "user": {"id": "u-1"},
             "consent": {"marketing": True}}
    old = [TimestampedValue(json.dumps({**event, "id": f"e-{n}"}).encode(), T0 + n)
           for n in range(30)]
    bad = [TimestampedValue(f"not json {n}".encode(), T0 + n) for n in range(30)]
    stream = (test_stream.TestStream()
              .advance_watermark_to(T0 + 600)
              .add_elements(old + bad)
              .advance_watermark_to_infinity())
    calls_prefix, dead_prefix = tmp_path / "calls", tmp_path / "dead_letters"
    pipeline = beam.Pipeline(runner=BundleBasedDirectRunner(),
                             options=PipelineOptions(["--streaming"]))
    calls, dead = pipeline | stream | PlanCalls(CONFIG, ttl_seconds=3600,
                                                clock=lambda: T0 + 700.0)
    calls | WriteDryRun(str(calls_prefix), streaming=True, clock=lambda: T0 + 700.0)
    dead | WriteDeadLetters(topic=None, path=str(dead_prefix), streaming=True,
                            clock=lambda: T0 + 700.0)
    pipeline.run().wait_until_finish()

    assert len(_read_lines(dead_prefix)) == 30
    assert sorted(c["event_id"] for c in _read_lines(calls_prefix)) == sorted(
        f"e-{n}" for n in range(30))
    assert not list(tmp_path.glob(".temp*/*")), "lines left in a staging folder"
