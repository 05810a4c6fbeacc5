"""A streaming run (TestStream on BundleBasedDirectRunner): the identify state with out-of-order
and duplicate events and its expiry, and the windowed file outputs of a streaming dry run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue

from pipeline.assembly import PlanCalls
from transforms.dead_letters import WriteDeadLetters
from transforms.dry_run import WriteDryRun
from transforms.walkeros.config import load_config_file

CONFIG = load_config_file(str(Path(__file__).parents[1] / "examples" / "flow.json")).config
T0 = 1_764_320_000  # seconds; 2025-11-28
TTL = 3600


def _login(event_id: str, seconds: int, first_name: str) -> TimestampedValue:
    """A `user login` (the example config: a silent rule with an identify body), stamped with
    its event time as Pub/Sub's timestamp_attribute would."""
    event = {"name": "user login", "id": event_id, "timestamp": seconds * 1000,
             "user": {"id": "u-1", "email": "maya@example.org"},
             "data": {"firstName": first_name, "lastName": "Rao", "plan": "basic"},
             "consent": {"marketing": True}}
    return TimestampedValue(json.dumps(event).encode("utf-8"), seconds)


def _read_lines(prefix: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(prefix.parent.glob(f"{prefix.name}*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_identify_state_in_a_stream(tmp_path: Path) -> None:
    stream = (test_stream.TestStream()
              .add_elements([_login("a", T0, "Maya")])  # first body: upsert
              .add_elements([_login("b", T0 + 20, "Maya R.")])  # changed: upsert
              .add_elements([_login("c", T0 + 10, "Old")])  # older than b: no upsert
              .add_elements([_login("b", T0 + 20, "Maya R.")])  # duplicate: no upsert
              .add_elements([TimestampedValue(b"\xffnot json", T0 + 21)])  # dead letter
              .advance_watermark_to(T0 + 20 + TTL + 1)  # the state of u-1 expires
              .add_elements([_login("d", T0 + TTL + 30, "Maya R.")])  # forgotten: upsert
              .advance_watermark_to(T0 + 2 * TTL)
              .advance_watermark_to_infinity())
    calls_prefix, dead_prefix = tmp_path / "calls", tmp_path / "dead_letters"
    pipeline = beam.Pipeline(runner=BundleBasedDirectRunner(),
                             options=PipelineOptions(["--streaming"]))
    calls, dead = pipeline | stream | PlanCalls(CONFIG, ttl_seconds=TTL,
                                                clock=lambda: T0 + 86_400.0)
    calls | WriteDryRun(str(calls_prefix), streaming=True)
    dead | WriteDeadLetters(topic=None, path=str(dead_prefix), streaming=True)
    result = pipeline.run()
    result.wait_until_finish()

    written = _read_lines(calls_prefix)
    assert sorted((c["event_id"], c["method"]) for c in written) == [
        ("a", "create_or_update_profile"), ("b", "create_or_update_profile"),
        ("d", "create_or_update_profile")]
    names = {c["event_id"]: c["body"]["data"]["attributes"]["first_name"] for c in written}
    assert names == {"a": "Maya", "b": "Maya R.", "d": "Maya R."}

    [letter] = _read_lines(dead_prefix)
    assert letter["stage"] == "parse"
    assert letter["payload_encoding"] == "base64" and letter["payload"] == "/25vdCBqc29u"
    assert letter["reason"].startswith("not UTF-8")
    # Counters are not checked here: BundleBasedDirectRunner keeps only the first bundle's
    # counts of a step (verified with a plain Map); the batch tests check them.
