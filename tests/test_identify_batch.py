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
_OUT: list[dict[str, Any]] = []


def _keep(record: dict[str, Any]) -> None:
    """Module-level, so either runner (both in this process) finds this list."""
    _OUT.append(record)


def _planned(pipeline: beam.Pipeline, source: beam.PTransform
             ) -> tuple[list[str], dict[str, int]]:
    _OUT.clear()
    calls, _ = pipeline | source | PlanCalls(CONFIG, ttl_seconds=86_400, clock=lambda: NOW_S)
    calls | beam.Flatten() | beam.FlatMap(dry_run_records) | beam.Map(_keep)
    result = pipeline.run()
    result.wait_until_finish()
    totals = counter_totals(result)
    return (sorted(json.dumps(record, sort_keys=True) for record in _OUT),
            {name: totals.get(name, 0) for name in VERDICTS})


def test_batch_and_streaming_identify_state_plan_the_same() -> None:
    batch = _planned(beam.Pipeline(runner=FnApiRunner()), beam.Create(LINES))
    stream = EventStream()
    for line in LINES:
        stream.add_elements([line])
    stream.advance_watermark_to_infinity()
    streaming = _planned(beam.Pipeline(runner=BundleBasedDirectRunner(),
                                       options=PipelineOptions(["--streaming"])), stream)
    calls, verdicts = batch
    assert calls == streaming[0]
    assert verdicts == {"profiles_planned": 4, "profiles_unchanged": 2,
                        "profiles_out_of_order": 1, "events_planned": 7, "identify_only": 0}
    upserts = [json.loads(call) for call in calls
               if json.loads(call)["method"] == "create_or_update_profile"]
    assert sorted(upsert["event_id"] for upsert in upserts) == ["a", "b", "c", "g"]
