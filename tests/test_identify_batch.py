"""The identify state of a batch run (a key's events grouped and decided in turn, no state
cells) plans the calls the streaming one (keyed state, an expiry timer) plans for the same
events in the same order. (The verdicts are counted in the batch run; BundleBasedDirectRunner's
streaming result does not report every step's counters.)"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_stream import TestStream as EventStream

from pipeline.assembly import PlanCalls
from pipeline.run_job import counter_totals
from transforms.dry_run import dry_run_records
from transforms.walkeros.config import load_config

CONFIG = load_config({
    "consent": {"marketing": True},
    "settings": {"identify": {"map": {"firstName": "data.firstName"}}},
}).config
NOW_S = 1_764_400_000.0
VERDICTS = ("profiles_planned", "profiles_unchanged", "profiles_out_of_order", "events_planned",
            "identify_only")


def _login(event_id: str, user: str, seconds: float, first_name: str) -> bytes:
    return json.dumps({"name": "user login", "id": event_id, "timestamp": seconds * 1000,
                       "user": {"id": user, "email": f"{user}@example.org"},
                       "data": {"firstName": first_name},
                       "consent": {"marketing": True}}).encode("utf-8")


LINES = [
    _login("a", "u-1", NOW_S - 60, "Maya"),  # first body: upsert
    _login("b", "u-2", NOW_S - 50, "Ravi"),
    _login("c", "u-1", NOW_S - 40, "Maya R."),  # changed: upsert
    _login("d", "u-1", NOW_S - 50, "Old"),  # older than c: no upsert
    _login("e", "u-1", NOW_S - 30, "Maya R."),  # unchanged: a hint
    _login("f", "u-2", NOW_S - 20, "Ravi"),  # unchanged
    b'{"name": "product view", "id": "g", "user": {"id": "u-3"}, "consent": {"marketing": true}}',
]
_OUT: list[str] = []


def _keep(outgoing: Any) -> None:
    """Module-level, so either runner (both in this process) finds this list. The calls as
    JSON text (ASCII) in the step that makes them: a lone surrogate in a string between two
    steps would fail Beam's strict UTF-8 coder, as transforms/json_lines.py says."""
    _OUT.extend(json.dumps(record, sort_keys=True) for record in dry_run_records(outgoing))


def _planned(pipeline: beam.Pipeline, source: beam.PTransform
             ) -> tuple[list[str], dict[str, int]]:
    _OUT.clear()
    calls, _ = pipeline | source | PlanCalls(CONFIG, ttl_seconds=86_400, clock=lambda: NOW_S)
    calls | beam.Flatten() | beam.Map(_keep)
    result = pipeline.run()
    result.wait_until_finish()
    totals = counter_totals(result)
    return (sorted(_OUT),
            {name: totals.get(name, 0) for name in VERDICTS})


def _batch_and_streaming(lines: list[bytes]
                         ) -> tuple[tuple[list[str], dict[str, int]], list[str]]:
    """(calls and verdicts of a batch run, calls of a streaming run) over `lines`."""
    batch = _planned(beam.Pipeline(runner=FnApiRunner()), beam.Create(lines))
    stream = EventStream()
    for line in lines:
        stream.add_elements([line])
    stream.advance_watermark_to_infinity()
    streaming = _planned(beam.Pipeline(runner=BundleBasedDirectRunner(),
                                       options=PipelineOptions(["--streaming"])), stream)
    return batch, streaming[0]


def _upserted(calls: list[str]) -> list[str]:
    """The event ids of the upserts among `calls`, sorted."""
    return sorted(json.loads(call)["event_id"] for call in calls
                  if json.loads(call)["method"] == "create_or_update_profile")


def test_batch_and_streaming_identify_state_plan_the_same() -> None:
    (calls, verdicts), streaming = _batch_and_streaming(LINES)
    assert calls == streaming
    assert verdicts == {"profiles_planned": 4, "profiles_unchanged": 2,
                        "profiles_out_of_order": 1, "events_planned": 7, "identify_only": 0}
    assert _upserted(calls) == ["a", "b", "c", "g"]


def test_a_profile_key_with_a_lone_surrogate_goes_through_the_identify_state() -> None:
    """JSON may escape a lone surrogate (`"u-\\ud800"`), which the standard parser takes; Beam
    encodes a key as strict UTF-8, so the key of such a profile must be another string."""
    (calls, verdicts), streaming = _batch_and_streaming([
        _login("s1", "u-\ud800", NOW_S - 60, "Maya"), _login("s2", "u-\ud800", NOW_S - 50, "Maya"),
        _login("s3", "u-\udfff", NOW_S - 40, "Maya")])
    assert calls == streaming
    assert verdicts["profiles_planned"] == 2 and verdicts["profiles_unchanged"] == 1
    assert _upserted(calls) == ["s1", "s3"]
