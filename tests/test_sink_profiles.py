"""Profiles end right in Klaviyo (issue 8), against the local Klaviyo test server with faults on:
a shuffled backfill of users changing attributes, a client clock in microseconds, `null`
clearing a field however many upserts share a flush, each event's upsert accepted before the
event, and a flush that keeps to its budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.transforms.window import TimestampedValue

from bench.backfill import CONFIG, generate, run_command, write_inputs, wrong_profiles
from pipeline.assembly import PlanCalls
from pipeline.cli import main as cli_main
from pipeline.replay import replay_of
from tests.klaviyo_server import (
    BULK_EVENTS,
    BULK_PROFILE_IMPORT,
    IMPORT_JOB,
    PROFILE_IMPORT,
    Fault,
    KlaviyoTestServer,
)
from tests.test_sink import event_call, run_batch, settings
from transforms.elements import Envelope, OutgoingEvent
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.flush import ProfileMemory
from transforms.klaviyo.plan import Call
from transforms.klaviyo.rate_limit import RateLimiter
from transforms.klaviyo.retry import Retrier
from transforms.klaviyo.sender import KlaviyoSender
from transforms.klaviyo.wire import CREATE_OR_UPDATE_PROFILE
from transforms.sink import Flush, SendToKlaviyo, Tally, Task, Work

pytest_plugins = ["tests.conftest_klaviyo"]


def _dead_letters(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(directory.glob("dead*"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def _faults() -> list[Fault]:
    return [Fault.error(503), Fault.drop_after_write(), Fault.error(500), Fault.throttle(1),
            Fault.error(502)]


@pytest.mark.parametrize("bulk_threshold", [100, 3], ids=["profile_import", "bulk_import"])
def test_a_shuffled_backfill_ends_with_every_users_newest_profile(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path, bulk_threshold: int) -> None:
    events, truth = generate(600, 40, seed=11)
    events_path, config_path = write_inputs(tmp_path, events)
    for route in (PROFILE_IMPORT, BULK_PROFILE_IMPORT, IMPORT_JOB, BULK_EVENTS):
        klaviyo_server.inject(route, *_faults())
    command = run_command(klaviyo_server, events_path, config_path, tmp_path / "dead",
                          "--profile_bulk_threshold", str(bulk_threshold))
    assert cli_main(command) == 0
    assert _dead_letters(tmp_path) == []
    stored = klaviyo_server.stored_unique_ids()
    assert sorted(stored) == sorted(event["id"] for event in events)  # each stored once
    assert wrong_profiles(klaviyo_server, truth) == []


def _login(event_id: str, timestamp_ms: float, first_name: str) -> dict[str, Any]:
    return {"name": "user login", "id": event_id, "timestamp": timestamp_ms,
            "user": {"id": "u-clock", "email": "clock@example.org"},
            "data": {"firstName": first_name, "lastName": "Rao", "plan": "pro", "city": "Rome"}}


def test_a_microsecond_timestamp_does_not_freeze_the_profile(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path) -> None:
    start = 1_764_000_000_000
    events = [_login("a", start, "First"), _login("b", start * 1000 + 5, "Bogus"),
              _login("c", start + 60_000, "Second"), _login("d", start + 120_000, "Newest")]
    events_path, config_path = write_inputs(tmp_path, events)
    assert cli_main(run_command(klaviyo_server, events_path, config_path,
                                tmp_path / "dead")) == 0
    assert klaviyo_server.profile(external_id="u-clock")["first_name"] == "Newest"
    dead = _dead_letters(tmp_path)
    assert [(d["event_id"], d["stage"]) for d in dead] == [("b", "preflight")]  # its event


def _upsert(index: int, properties: dict[str, Any]) -> OutgoingEvent:
    email = f"null{index}@example.org"
    body = {"data": {"type": "profile", "attributes": {"email": email, "first_name": "N",
                                                       "properties": properties}}}
    return OutgoingEvent(Envelope(b"{}"), f"p-{index}", email, 1.7e12,
                         Call(CREATE_OR_UPDATE_PROFILE, body), profile_changed=True)


@pytest.mark.parametrize("count", [5, 500])
def test_null_clears_a_field_however_many_upserts_share_a_flush(
        klaviyo_server: KlaviyoTestServer, count: int) -> None:
    sink = settings(klaviyo_server, shards=1)
    assert run_batch([_upsert(i, {"tier": "gold", "seen": 1}) for i in range(count)], sink) == []
    assert klaviyo_server.profile(email="null0@example.org")["properties"]["tier"] == "gold"
    assert run_batch([_upsert(i, {"tier": None}) for i in range(count)], sink) == []
    for index in range(count):
        stored = klaviyo_server.profile(email=f"null{index}@example.org")
        assert stored["properties"] == {"seen": 1}, stored
    # the first run, without nulls, went as bulk import jobs when there were many
    bulk = klaviyo_server.statuses(BULK_PROFILE_IMPORT)
    assert (len(bulk) > 0) == (count > 100)


def _accepted_upserts(server: KlaviyoTestServer) -> dict[str, int]:
    """Profile → seq of the first answer that told the sink its upsert was accepted: a 200/201
    from profile-import, or "complete" for the import job that carried it."""
    accepted: dict[str, int] = {}
    for entry in server.requests(PROFILE_IMPORT):
        if entry.status in (200, 201):
            for profile in entry.profiles:
                accepted.setdefault(profile, entry.seq)
    jobs = {entry.job_id: entry.profiles for entry in server.requests(BULK_PROFILE_IMPORT)
            if entry.status == 202}
    for entry in server.requests(IMPORT_JOB):
        if entry.job_status == "complete":
            for profile in jobs[entry.job_id]:
                accepted.setdefault(profile, entry.seq)
    return accepted


@pytest.mark.parametrize("bulk_threshold", [100, 2], ids=["profile_import", "bulk_import"])
def test_each_events_upsert_is_accepted_before_the_event(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path, bulk_threshold: int) -> None:
    events, _ = generate(300, 12, seed=5)
    events_path, config_path = write_inputs(tmp_path, events)
    klaviyo_server.inject(PROFILE_IMPORT, Fault.error(503), Fault.drop_after_write())
    klaviyo_server.inject(IMPORT_JOB, Fault.error(503))
    assert cli_main(run_command(klaviyo_server, events_path, config_path, tmp_path / "dead",
                                "--profile_bulk_threshold", str(bulk_threshold))) == 0
    accepted_upsert = _accepted_upserts(klaviyo_server)
    stored_at: dict[str, int] = {}  # unique id → seq of the request that stored it
    for entry in klaviyo_server.requests(BULK_EVENTS):
        if entry.status == 202:
            for unique_id in entry.unique_ids:
                stored_at.setdefault(unique_id, entry.seq)
    with_upsert = [event for event in events if event["name"] != "product view"]
    assert with_upsert and len(stored_at) == len(events)
    for event in with_upsert:
        profile = event["user"]["email"]
        assert accepted_upsert[profile] < stored_at[event["id"]], event["id"]
    assert bool(klaviyo_server.requests(BULK_PROFILE_IMPORT)) == (bulk_threshold < 100)


# --- streaming: an outage of the profile endpoints, healed, and the dead letters replayed ------

_STREAM: dict[str, Any] = {}  # the test's server and what the pipeline dead-lettered


def _collect(record: Any) -> None:
    _STREAM["dead"].append(record.to_json())


def _heal_when_the_replay_arrives(outgoing: OutgoingEvent) -> OutgoingEvent:
    """Klaviyo comes back before the first replayed event reaches the sink (the same process
    runs the pipeline: BundleBasedDirectRunner)."""
    if outgoing.envelope.attributes.get("replay"):
        _STREAM["server"].clear_faults()
    return outgoing


def test_a_streaming_outage_healed_and_replayed_ends_with_every_profile_newest(
        klaviyo_server: KlaviyoTestServer) -> None:
    """Profile endpoints fail past the retry deadline; the upsert dead letters carry the newest
    body of each user; replayed into the running job (whose identify state calls them
    unchanged), they are sent, and a later change is sent too."""
    events, truth = generate(120, 8, seed=3)
    events.sort(key=lambda event: event["timestamp"])
    identify = [event for event in events if event["name"] != "product view"]
    newest = {event["user"]["id"]: event for event in identify}  # the last one per user wins
    later = dict(identify[-1], id="later", timestamp=identify[-1]["timestamp"] + 1000,
                 data={**identify[-1]["data"], "firstName": "Later"})
    truth[later["user"]["id"]] = {**truth[later["user"]["id"]], "firstName": "Later"}
    _STREAM.update(server=klaviyo_server, dead=[])
    klaviyo_server.inject(PROFILE_IMPORT, *[Fault.error(503)] * 100_000)

    def stamped(event: dict[str, Any], **attributes: str) -> TimestampedValue:
        message = PubsubMessage(json.dumps(event).encode(), attributes)
        return TimestampedValue(message, event["timestamp"] / 1000)

    stream = EventStream().add_elements([stamped(event) for event in events])
    for _ in range(5):
        stream.advance_processing_time(10)  # flushes: the upserts fail until their deadline
    # what `replay` publishes for the upsert dead letters: the original events, ids and times
    # kept (replay_of), marked so that the test knows them
    replays = [json.loads(replay_of({"payload": json.dumps(event)}).payload)
               for event in newest.values()]
    stream.add_elements([stamped(event, replay="1") for event in [*replays, later]])
    for _ in range(5):
        stream.advance_processing_time(10)
    stream.advance_watermark_to(later["timestamp"] / 1000 + 3600)
    stream.advance_watermark_to_infinity()
    sink = settings(klaviyo_server, shards=2, max_retry_seconds=0.5, flush_budget_seconds=2.0,
                    batch_max_delay_ms=5000)
    pipeline = beam.Pipeline(runner=BundleBasedDirectRunner(),
                             options=PipelineOptions(["--streaming"]))
    calls, _ = pipeline | stream | PlanCalls(CONFIG, ttl_seconds=86_400,
                                             clock=lambda: later["timestamp"] / 1000)
    (calls | beam.Flatten() | beam.Map(_heal_when_the_replay_arrives)
     | SendToKlaviyo(sink, clock=lambda: 0.0) | beam.Map(_collect))
    pipeline.run().wait_until_finish()

    dead_upserts = {d["event_id"] for d in _STREAM["dead"]
                    if d["call"]["method"] == CREATE_OR_UPDATE_PROFILE}
    # the outage was real: upserts died, among them users' newest (the bodies that the identify
    # state calls unchanged when replayed), and every dead letter has what replay needs
    assert dead_upserts & {event["id"] for event in newest.values()}
    assert all(d["payload"] and d["call"]["body"] for d in _STREAM["dead"])
    assert not [d for d in _STREAM["dead"] if d["attributes"].get("replay")]
    assert wrong_profiles(klaviyo_server, truth) == []


class _FakeClock:
    """Time that moves only when someone waits: what a flush spends is what it waited."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def test_a_flush_keeps_to_its_budget_and_the_retry_deadline_spans_flushes(
        klaviyo_server: KlaviyoTestServer) -> None:
    """Klaviyo keeps failing: each flush stops waiting at its budget and keeps the calls; the
    call becomes a dead letter once `max_retry_seconds` have passed since its first attempt,
    across flushes, with its last error."""

    clock = _FakeClock()
    klaviyo_server.inject(PROFILE_IMPORT, *[Fault.error(503)] * 10_000)
    klaviyo_server.inject(BULK_EVENTS, *[Fault.error(500)] * 10_000)
    client = KlaviyoClient(klaviyo_server.api_key, test_host=klaviyo_server.url)
    tally = Tally()
    sender = KlaviyoSender(client, RateLimiter(scale=60, share=0.5, clock=clock,
                                               sleep=clock.sleep),
                           Retrier(clock=clock, sleep=clock.sleep), tally)
    sink = settings(klaviyo_server, flush_budget_seconds=5.0, max_retry_seconds=12.0)
    upsert = _upsert(1, {"tier": "gold"})
    work = Work([Task.of(upsert), Task.of(event_call(2))])
    memory = ProfileMemory()
    spent = []
    dead: list[Any] = []
    while work.tasks:
        flush = Flush(sender, sink, tally, now=clock, monotonic=clock)
        started = clock.now
        work = flush.run(work, memory)
        spent.append(clock.now - started)
        dead += flush.dead
        clock.sleep(1.0)  # the timer that runs the next flush
    assert max(spent) <= sink.flush_budget_seconds
    assert len(spent) >= 3  # the deadline spanned flushes
    assert sorted(d.call.method for d in dead) == ["create_event", "create_or_update_profile"]
    assert all("503" in d.reason or "500" in d.reason for d in dead)
    assert tally.throttled_seconds > 0  # the back-off was counted as throttling
    assert memory.failed(upsert.profile_key or "")


def test_upserts_reaching_the_sink_in_any_order_leave_the_newest(
        klaviyo_server: KlaviyoTestServer) -> None:
    """A shuffle keeps no order: five bodies per profile arrive shuffled, across several
    streaming flushes; Klaviyo ends with each profile's newest, and never gets an older body
    after a newer one was accepted."""
    import random

    rng = random.Random(4)
    upserts = [OutgoingEvent(Envelope(b"{}"), f"p-{user}-{version}", f"o{user}@example.org",
                             1.7e12 + version * 1000,
                             Call(CREATE_OR_UPDATE_PROFILE, {"data": {"type": "profile",
                                  "attributes": {"email": f"o{user}@example.org",
                                                 "first_name": f"v{version}"}}}),
                             profile_changed=True)
               for user in range(20) for version in range(5)]
    rng.shuffle(upserts)
    stream = EventStream()
    for start in range(0, len(upserts), 10):
        stream.add_elements(upserts[start:start + 10])
        stream.advance_processing_time(6)  # past batch_max_delay_ms: a flush
    stream.advance_watermark_to(10**6)
    stream.advance_watermark_to_infinity()
    sink = settings(klaviyo_server, shards=2, batch_max_delay_ms=5000)
    with beam.Pipeline(runner=BundleBasedDirectRunner(),
                       options=PipelineOptions(["--streaming"])) as pipeline:
        _ = pipeline | stream | SendToKlaviyo(sink, clock=lambda: 0.0)
    assert {klaviyo_server.profile(email=f"o{user}@example.org")["first_name"]
            for user in range(20)} == {"v4"}
