"""The Beam sink against the local Klaviyo test server: batching bounds, the flush at the end of
input (what a drain does), bulk 400 isolation, faults, and a refused key stopping the job.
The identify-state outcomes (newest wins, upsert before event, null, replay) are in
tests/test_sink_profiles.py."""

from __future__ import annotations

import json
import zlib
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.utils.timestamp import Timestamp

from pipeline.run_job import counter_totals
from tests.klaviyo_server import BULK_EVENTS, PROFILE_IMPORT, Fault, KlaviyoTestServer
from transforms.dead_letters import SINK
from transforms.elements import Envelope, OutgoingEvent
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.klaviyo.plan import Call
from transforms.klaviyo.wire import CREATE_EVENT, CREATE_OR_UPDATE_PROFILE
from transforms.metrics import dead_letter_reason_counter_name
from transforms.sink import COMPACT_EVERY, SendToKlaviyo, SinkSettings, shard_key

pytest_plugins = ["tests.conftest_klaviyo"]
TIME = "2026-11-28T10:00:00.000Z"


def event_call(index: int, *, email: str | None = None, time: str = TIME,
               **attributes: Any) -> OutgoingEvent:
    profile = {"email": email or f"user{index % 7}@example.org"}
    body = {"data": {"type": "event", "attributes": {
        "profile": {"data": {"type": "profile", "attributes": profile}},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product"}}},
        "properties": {"n": index}, "time": time, "unique_id": f"e-{index}", **attributes}}}
    payload = json.dumps({"name": "product view", "id": f"e-{index}"}).encode()
    return OutgoingEvent(Envelope(payload), f"e-{index}", profile["email"], 0.0,
                         event=Call(CREATE_EVENT, body))


def profile_call(index: int) -> OutgoingEvent:
    email = f"user{index}@example.org"
    body = {"data": {"type": "profile", "attributes": {"email": email, "first_name": f"N{index}"}}}
    return OutgoingEvent(Envelope(b"{}"), f"p-{index}", email, 1.7e12,
                         Call(CREATE_OR_UPDATE_PROFILE, body), profile_changed=True)


def settings(server: KlaviyoTestServer, **overrides: Any) -> SinkSettings:
    values: dict[str, Any] = {
        "api_key": ApiKeySource(literal=server.api_key), "base_url": server.url,
        "batch_max_events": 50, "batch_max_delay_ms": 60_000, "shards": 2,
        "rate_limit_scale": server.time_scale, "max_retry_seconds": 30}
    return SinkSettings(**(values | overrides))


_DEAD_LETTERS: list[dict[str, Any]] = []


def _collect(record: Any) -> None:
    """Module-level, so the runner (same process) unpickles it by reference to this list."""
    _DEAD_LETTERS.append(record.to_json())


def run_sink(calls: list[OutgoingEvent], sink: SinkSettings
             ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Run the sink on FnApiRunner; the dead letters as JSON, and the pipeline's counters."""
    _DEAD_LETTERS.clear()
    pipeline = beam.Pipeline(runner=FnApiRunner())
    dead = pipeline | beam.Create(calls) | SendToKlaviyo(sink)
    dead | beam.Map(_collect)
    result = pipeline.run()
    result.wait_until_finish()
    return list(_DEAD_LETTERS), counter_totals(result)


def run_batch(calls: list[OutgoingEvent], sink: SinkSettings) -> list[dict[str, Any]]:
    """Run the sink on FnApiRunner; the dead letters as JSON."""
    return run_sink(calls, sink)[0]


def test_every_event_stored_once_in_bounded_batches(klaviyo_server: KlaviyoTestServer) -> None:
    calls = [event_call(index) for index in range(230)]
    dead = run_batch(calls, settings(klaviyo_server))
    assert dead == []
    assert sorted(klaviyo_server.stored_unique_ids()) == sorted(f"e-{i}" for i in range(230))
    sizes = [entry.events for entry in klaviyo_server.log if entry.route == BULK_EVENTS]
    assert max(sizes) <= 50 and sum(sizes) == 230
    # the batches left at the end of input are flushed by the window-end timer, not lost
    assert any(size < 50 for size in sizes)


def test_a_bad_entry_is_dead_lettered_and_the_rest_delivered(
        klaviyo_server: KlaviyoTestServer) -> None:
    calls = [event_call(index) for index in range(20)]
    calls[7] = event_call(7, time="1999-12-31T00:00:00.000Z")  # Klaviyo refuses this time
    dead = run_batch(calls, settings(klaviyo_server))
    assert [record["event_id"] for record in dead] == ["e-7"]
    assert dead[0]["stage"] == "sink" and dead[0]["call"]["method"] == "create_event"
    assert "e-7" not in klaviyo_server.stored_unique_ids()
    assert len(klaviyo_server.stored_unique_ids()) == 19


def test_dead_letters_are_counted_by_reason(klaviyo_server: KlaviyoTestServer) -> None:
    calls = [event_call(index) for index in range(6)]
    calls[1] = event_call(1, time="1999-12-31T00:00:00.000Z")  # Klaviyo answers 400
    calls[4] = event_call(4, value="a lot")  # the SDK refuses it before sending
    dead, counters = run_sink(calls, settings(klaviyo_server))
    assert sorted(record["event_id"] for record in dead) == ["e-1", "e-4"]
    by_reason = {name: value for name, value in counters.items()
                 if name.startswith("dead_letters_sink_")}
    assert by_reason == {"dead_letters_sink_400": 1, "dead_letters_sink_invalid_request": 1}
    assert counters["events_delivered"] == 4


def test_reason_labels_make_tidy_metric_names() -> None:
    names = {label: dead_letter_reason_counter_name(SINK, label)
             for label in ("job_timeout", " Weird: Label/2 ", "-", "x" * 500)}
    assert names == {"job_timeout": "dead_letters_sink_job_timeout",
                     " Weird: Label/2 ": "dead_letters_sink_weird_label_2",
                     "-": "dead_letters_sink_other",
                     "x" * 500: "dead_letters_sink_" + "x" * 24}


def test_faults_are_retried_without_duplicates(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.error(503), Fault.drop_after_write(),
                          Fault.error(500), Fault.throttle(1))
    calls = [event_call(index) for index in range(120)]
    assert run_batch(calls, settings(klaviyo_server)) == []
    stored = klaviyo_server.stored_unique_ids()
    assert sorted(stored) == sorted(f"e-{i}" for i in range(120))  # once each, despite resends
    assert klaviyo_server.events_received > 120  # the dropped request really was resent


def test_profiles_go_their_own_way_and_many_go_as_a_bulk_import(
        klaviyo_server: KlaviyoTestServer) -> None:
    few = [profile_call(index) for index in range(3)]
    assert run_batch(few, settings(klaviyo_server)) == []
    assert klaviyo_server.statuses(PROFILE_IMPORT) and not klaviyo_server.statuses(BULK_EVENTS)
    many = [profile_call(index) for index in range(10, 40)]
    assert run_batch(many, settings(klaviyo_server, profile_bulk_threshold=5,
                                    batch_max_events=100, shards=1)) == []
    assert klaviyo_server.profile(email="user39@example.org")["first_name"] == "N39"
    assert len(klaviyo_server.statuses(PROFILE_IMPORT)) == 3  # the 30 went as one import job


def test_a_refused_key_stops_the_job(klaviyo_server: KlaviyoTestServer) -> None:
    wrong = settings(klaviyo_server, api_key=ApiKeySource(literal="pk_wrong_key"))
    with pytest.raises(Exception) as error:
        run_batch([event_call(1)], wrong)
    assert "KlaviyoConfigurationError" in repr(error.value) or isinstance(
        error.value, KlaviyoConfigurationError)
    assert "pk_wrong_key" not in str(error.value)


def test_drain_flushes_a_partial_batch_in_streaming(klaviyo_server: KlaviyoTestServer) -> None:
    """A streaming run whose buffers never fill: ending the input (what Dataflow's drain does
    to the watermark) flushes them through the window-end timer."""
    stream = EventStream()
    for index in range(10):
        stream.add_elements([event_call(index)], event_timestamp=Timestamp(index))
    stream.advance_watermark_to(Timestamp(100))
    stream.advance_watermark_to_infinity()
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    with beam.Pipeline(runner=BundleBasedDirectRunner(), options=options) as pipeline:
        _ = pipeline | stream | SendToKlaviyo(settings(klaviyo_server))
    assert sorted(klaviyo_server.stored_unique_ids()) == sorted(f"e-{i}" for i in range(10))


def test_a_compacted_streaming_buffer_keeps_every_call_once(
        klaviyo_server: KlaviyoTestServer) -> None:
    """One element per bundle, past two compactions of the key's buffer (COMPACT_EVERY): the
    drain's flush finds every call once, none lost or doubled by the rewrite."""
    count = 2 * COMPACT_EVERY + 7
    stream = EventStream()
    for index in range(count):
        stream.add_elements([event_call(index)], event_timestamp=Timestamp(index))
    stream.advance_watermark_to_infinity()
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    sink = settings(klaviyo_server, shards=1, batch_max_events=1000)
    with beam.Pipeline(runner=BundleBasedDirectRunner(), options=options) as pipeline:
        _ = pipeline | stream | SendToKlaviyo(sink)
    sizes = [entry.events for entry in klaviyo_server.log if entry.route == BULK_EVENTS]
    assert sizes == [count]
    assert sorted(klaviyo_server.stored_unique_ids()) == sorted(f"e-{i}" for i in range(count))


def _test_stream_now() -> float:
    """The sink's clock in TestStream runs: TestStream's processing time starts at 0 and moves
    only with `advance_processing_time` (beam.md §1.4), so the delay timer is armed at
    0 + batch_max_delay_ms and fires once the stream's clock has passed it."""
    return 0.0


def test_a_partial_batch_is_sent_after_the_delay(klaviyo_server: KlaviyoTestServer) -> None:
    """The processing-time timer sends what is buffered once batch_max_delay_ms has passed,
    long before the window ends, and not before."""
    stream = EventStream()
    stream.add_elements([event_call(index) for index in range(3)])
    stream.advance_processing_time(4)  # 4 s < 5 s: nothing is due yet
    stream.add_elements([event_call(3)])
    stream.advance_processing_time(2)  # 6 s: the first batch is due
    stream.add_elements([event_call(index) for index in range(4, 6)])
    stream.advance_watermark_to(Timestamp(100))
    stream.advance_watermark_to_infinity()
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    sink = settings(klaviyo_server, shards=1, batch_max_delay_ms=5000)
    with beam.Pipeline(runner=BundleBasedDirectRunner(), options=options) as pipeline:
        _ = pipeline | stream | SendToKlaviyo(sink, clock=_test_stream_now)
    sizes = [entry.events for entry in klaviyo_server.log if entry.route == BULK_EVENTS]
    assert sizes[0] == 4  # what was buffered when the delay ran out, not the 2 added after
    assert sum(sizes) == 6
    assert sorted(klaviyo_server.stored_unique_ids()) == sorted(f"e-{i}" for i in range(6))


def test_a_profiles_upserts_and_events_share_a_stable_key() -> None:
    assert shard_key(event_call(1, email="user1@example.org"), 8) == shard_key(profile_call(1), 8)
    assert shard_key(event_call(1, email="a@x.org"), 8) == f"shard/{zlib.crc32(b'a@x.org') % 8}"



def test_waiting_is_counted_as_throttling(klaviyo_server: KlaviyoTestServer) -> None:
    """A 429 with Retry-After: 2 is waited out, and the wait is reported in Beam's
    cumulativeThrottlingSeconds (what Dataflow's autoscaler reads)."""
    klaviyo_server.inject(BULK_EVENTS, Fault.throttle(2))
    dead, counters = run_sink([event_call(index) for index in range(3)], settings(klaviyo_server))
    assert dead == [] and counters["events_delivered"] == 3
    assert counters["cumulativeThrottlingSeconds"] >= 1


def test_every_keys_dead_letters_and_counts_reach_the_end_of_a_batch_job(
        klaviyo_server: KlaviyoTestServer) -> None:
    """Four keys flushed together at the end of a batch job (finish_bundle), each with several
    requests (encoded ahead from each grant), dead letters in first and later requests of
    several keys, refused by Klaviyo (400) or by the SDK: each dead letter once, every other
    event stored once, and the counts of every key's flush reported."""
    calls = [event_call(index) for index in range(400)]
    old = list(range(3, 400, 37))  # Klaviyo answers 400 for these
    refused = list(range(20, 400, 53))  # the SDK refuses these before sending
    for index in old:
        calls[index] = event_call(index, time="1999-12-31T00:00:00.000Z")
    for index in refused:
        calls[index] = event_call(index, value="a lot")
    bad = sorted(set(old) | set(refused))
    sink = settings(klaviyo_server, shards=4, batch_max_events=20)
    assert len({shard_key(call, 4) for index, call in enumerate(calls) if index in bad}) > 1

    dead, counters = run_sink(calls, sink)

    assert sorted(record["event_id"] for record in dead) == sorted(f"e-{i}" for i in bad)
    assert sorted(klaviyo_server.stored_unique_ids()) == sorted(
        f"e-{i}" for i in range(400) if i not in bad)
    assert counters["events_delivered"] == 400 - len(bad)
    assert counters["dead_letters_sink_400"] == len(set(old) - set(refused))
    assert counters["dead_letters_sink_invalid_request"] == len(refused)
    requests = sum(value for name, value in counters.items()
                   if name.startswith("bulk_events_requests_"))
    assert requests == len(klaviyo_server.statuses(BULK_EVENTS)) > 4 * 5


def test_a_refused_key_stops_a_job_of_many_keys_after_one_request_each(
        klaviyo_server: KlaviyoTestServer) -> None:
    """Every key's flush starts at once at the end of a batch job: each stops at its first
    refusal, and the job stops with the sink's configuration error, the key not in it."""
    wrong = settings(klaviyo_server, api_key=ApiKeySource(literal="pk_wrong_key"), shards=4,
                     batch_max_events=10)
    with pytest.raises(Exception) as error:
        run_batch([event_call(index) for index in range(200)], wrong)
    assert "KlaviyoConfigurationError" in repr(error.value) or isinstance(
        error.value, KlaviyoConfigurationError)
    assert "pk_wrong_key" not in str(error.value)
    assert 1 <= len(klaviyo_server.statuses(BULK_EVENTS)) <= 4
