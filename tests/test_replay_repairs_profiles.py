"""Replaying the sink's own dead letters repairs profiles (issue 8), end to end.

The profile endpoints of the local Klaviyo test server fail past a short `--max_retry_seconds`,
so the job dead-letters upserts; the server heals; the project's `replay` command sends the
recorded dead letters back, into a fresh batch job (`run --input`) or into the running streaming
job (its input topic on the Pub/Sub emulator). Every user's profile must then hold the newest
values the test's generator gave them (the truth is the generator's, not the planner's), and no
event is stored twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.backfill import generate, run_command, write_inputs, wrong_profiles
from pipeline.cli import main as cli_main
from pipeline.replay import main as replay_main
from tests.klaviyo_server import (
    BULK_EVENTS,
    BULK_PROFILE_IMPORT,
    PROFILE_IMPORT,
    Fault,
    KlaviyoTestServer,
)
from tests.test_local_streaming import ROOT, _wait_for
from tests.test_pipeline_pubsub import _stop, emulator  # noqa: F401 - the emulator fixture
from tests.test_replay import _drain

pytest_plugins = ["tests.conftest_klaviyo"]

OUTAGE = 100_000  # more failures than any retry loop reaches before its deadline
SHORT_DEADLINE = ("--max_retry_seconds", "0.5")


def _fail_profiles(server: KlaviyoTestServer) -> None:
    for route in (PROFILE_IMPORT, BULK_PROFILE_IMPORT):
        server.inject(route, *[Fault.error(503)] * OUTAGE)


def _upserts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sink's upsert dead letters among `records`."""
    return [record for record in records
            if record["stage"] == "sink" and record["call"]["method"] == "create_or_update_profile"]


def _sink_upserts(directory: Path) -> list[dict[str, Any]]:
    """The sink's upsert dead letters in the dead-letter files under `directory`."""
    return _upserts([json.loads(line) for path in sorted(directory.glob("dead*"))
                     for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])


def test_replayed_dead_letters_repair_profiles_in_a_fresh_batch_job(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path) -> None:
    events, truth = generate(300, 20, seed=8)
    events_path, config_path = write_inputs(tmp_path, events)
    _fail_profiles(klaviyo_server)
    first = tmp_path / "first"
    assert cli_main(run_command(klaviyo_server, events_path, config_path, first / "dead",
                                *SHORT_DEADLINE)) == 0
    dead = _sink_upserts(first)
    assert {record["event_id"] for record in dead}  # the outage was real: upserts died
    assert len(wrong_profiles(klaviyo_server, truth)) == len(truth)  # and no profile is right

    klaviyo_server.clear_faults()
    replayed = tmp_path / "replay.jsonl"
    assert replay_main(["--dead_letters", str(first / "dead*"), "--stage", "sink",
                        "--output", str(replayed)]) == 0
    second = tmp_path / "second"
    assert cli_main(run_command(klaviyo_server, replayed, config_path, second / "dead",
                                *SHORT_DEADLINE)) == 0
    assert _sink_upserts(second) == []
    assert wrong_profiles(klaviyo_server, truth) == []
    stored = klaviyo_server.stored_unique_ids()
    assert sorted(stored) == sorted(event["id"] for event in events)  # each stored once


# --- the running job: local streaming on the Pub/Sub emulator --------------------------------

PROJECT = "walkeros-repair"
DEADLINE_S = 240


def _accepted_event_sends(server: KlaviyoTestServer) -> Counter[str]:
    """Unique id → how many accepted bulk event requests carried it (a replayed event is sent
    again and deduplicated by Klaviyo: its second send shows the job has processed it)."""
    return Counter(unique_id for entry in server.requests(BULK_EVENTS) if entry.status == 202
                   for unique_id in entry.unique_ids)


def test_replayed_dead_letters_repair_profiles_in_the_running_job(
        emulator: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        klaviyo_server: KlaviyoTestServer, tmp_path: Path) -> None:
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    events_topic, dead_topic = (publisher.topic_path(PROJECT, name) for name in ("events", "dead"))
    for topic in (events_topic, dead_topic):
        publisher.create_topic(name=topic)
    subscriptions = {name: subscriber.subscription_path(PROJECT, name)
                     for name in ("events", "dead", "watch")}
    subscriber.create_subscription(name=subscriptions["events"], topic=events_topic)
    for name in ("dead", "watch"):  # `replay` drains one; the test reads the other
        subscriber.create_subscription(name=subscriptions[name], topic=dead_topic)

    events, truth = generate(240, 16, seed=21)
    _, config_path = write_inputs(tmp_path, events)
    _fail_profiles(klaviyo_server)
    log = tmp_path / "job.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--input_subscription", subscriptions["events"],
         "--config", str(config_path), "--dead_letter_topic", dead_topic,
         "--klaviyo_base_url", klaviyo_server.url, "--klaviyo_api_key", klaviyo_server.api_key,
         "--rate_limit_scale", str(klaviyo_server.time_scale), "--batch_max_events", "20",
         "--batch_max_delay_ms", "500", *SHORT_DEADLINE],
        cwd=ROOT, env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator},
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)
    try:
        for future in [publisher.publish(events_topic, json.dumps(event).encode())
                       for event in events]:
            future.result()
        every_id = sorted(event["id"] for event in events)
        # An event is sent once its upsert was accepted or dead-lettered: when all are stored,
        # every upsert of the outage has died.
        _wait_for(lambda: sorted(map(str, klaviyo_server.stored_unique_ids())) == every_id,
                  process, log)
        assert len(wrong_profiles(klaviyo_server, truth)) == len(truth)  # none arrived

        klaviyo_server.clear_faults()
        assert replay_main(["--dead_letter_subscription", subscriptions["dead"],
                            "--topic", events_topic, "--stage", "sink"]) == 0
        recorded = [json.loads(message.data) for message in _drain(subscriber,
                                                                   subscriptions["watch"])]
        replayed = {record["event_id"] for record in _upserts(recorded)}
        assert replayed  # the outage was real: upserts died
        # Each replayed event's call was sent again, after its upsert was accepted or died.
        _wait_for(lambda: all(_accepted_event_sends(klaviyo_server)[event_id] >= 2
                              for event_id in replayed), process, log)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=DEADLINE_S) == 0, log.read_text()
    finally:
        _stop(process)
    assert wrong_profiles(klaviyo_server, truth) == []
    assert sorted(map(str, klaviyo_server.stored_unique_ids())) == every_id  # each stored once
    after = [json.loads(message.data) for message in _drain(subscriber, subscriptions["watch"])]
    assert _upserts(after) == []  # the healed server took every replayed upsert
