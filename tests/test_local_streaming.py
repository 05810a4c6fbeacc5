"""Local streaming stops without losing what it pulled (pipeline/local_streaming.py).

The job runs in a subprocess against gcloud's Pub/Sub emulator and the local Klaviyo test
server; the test stops it with a signal while a backlog is being delivered. Every published
event must then be either stored by Klaviyo or still waiting in the subscription: nothing
pulled is acknowledged and dropped. A sink that refuses to work (a JSON 403 from Klaviyo)
must stop the job with one line and leave what it did not deliver in the subscription.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1

from pipeline.local_streaming import LEASE_SECONDS, Leases
from tests.klaviyo_server import BULK_EVENTS, Fault, KlaviyoTestServer
from tests.test_pipeline_pubsub import _stop, emulator  # noqa: F401 - the emulator fixture

ROOT = Path(__file__).parents[1]
PROJECT = "walkeros-stop"
EVENTS = 300
DEADLINE_S = 180


def _event(index: int) -> bytes:
    return json.dumps({"name": "product view", "id": f"ev-{index:04d}",
                       "timestamp": 1_764_400_000_000 + index, "data": {"id": "p1"},
                       "user": {"id": f"u-{index % 40}"},
                       "consent": {"marketing": True}}).encode("utf-8")


def _resources(name: str) -> tuple[str, str, str]:
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, f"{name}-events")
    subscription = subscriber.subscription_path(PROJECT, f"{name}-events")
    dead = publisher.topic_path(PROJECT, f"{name}-dead")
    for path in (topic, dead):
        publisher.create_topic(name=path)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=10)
    futures = [publisher.publish(topic, _event(index)) for index in range(EVENTS)]
    for future in futures:
        future.result()
    return topic, subscription, dead


def _remaining(subscription: str) -> set[str]:
    """The event ids still in the subscription (pulled until empty, then acknowledged)."""
    subscriber = pubsub_v1.SubscriberClient()
    ids: set[str] = set()
    deadline = time.monotonic() + 60
    empty = 0
    while empty < 3 and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=5)
        if not response.received_messages:
            empty += 1
            continue
        ids |= {json.loads(received.message.data)["id"]
                for received in response.received_messages}
        subscriber.acknowledge(subscription=subscription,
                               ack_ids=[r.ack_id for r in response.received_messages])
    return ids


def _job(server: KlaviyoTestServer, subscription: str, dead: str, emulator_host: str,
         log: Path, preexec: Callable[[], Any] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--input_subscription", subscription,
         "--config", str(ROOT / "examples" / "flow.json"), "--dead_letter_topic", dead,
         "--klaviyo_base_url", server.url, "--klaviyo_api_key", server.api_key,
         "--rate_limit_scale", str(server.time_scale), "--batch_max_events", "20",
         "--batch_max_delay_ms", "500"],
        cwd=ROOT, env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator_host},
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True,
        preexec_fn=preexec)


def _run(emulator_host: str, subscription: str, dead: str, log: Path,
         act: Callable[[KlaviyoTestServer, subprocess.Popen[bytes]], None],
         preexec: Callable[[], Any] | None = None) -> tuple[int, set[str]]:
    """Run the job against a fresh Klaviyo test server, `act` on it, wait for its exit: the
    exit code and the event ids Klaviyo stored."""
    with KlaviyoTestServer(time_scale=60.0) as server:
        process = _job(server, subscription, dead, emulator_host, log, preexec)
        try:
            act(server, process)
            code = process.wait(timeout=DEADLINE_S)
        finally:
            _stop(process)
        return code, set(server.stored_unique_ids())


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path
              ) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell does for a background job


@pytest.mark.parametrize(("signum", "preexec"), [
    (signal.SIGINT, _ignore_sigint), (signal.SIGTERM, None)], ids=["SIGINT-ignored", "SIGTERM"])
def test_a_signal_stops_the_job_and_loses_nothing(
        emulator: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        tmp_path: Path, signum: int, preexec: Callable[[], Any] | None) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    _, subscription, dead = _resources(signal.Signals(signum).name.lower())
    log = tmp_path / "job.log"

    def stop_when_delivering(server: KlaviyoTestServer, process: subprocess.Popen[bytes]
                             ) -> None:
        _wait_for(lambda: len(server.stored_unique_ids()) >= 20, process, log)
        process.send_signal(signum)

    code, delivered = _run(emulator, subscription, dead, log, stop_when_delivering, preexec)
    err = log.read_text()
    assert code == 0, err
    assert "no more pulls" in err and "everything pulled was delivered" in err
    remaining = _remaining(subscription)
    assert delivered | remaining == {f"ev-{index:04d}" for index in range(EVENTS)}, err
    assert not delivered & remaining, "a delivered event was not acknowledged"


def test_a_refusing_sink_stops_pulling_and_leaves_the_backlog(
        emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: F811
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    _, subscription, dead = _resources("refused")
    log = tmp_path / "job.log"

    def refuse(server: KlaviyoTestServer, _process: subprocess.Popen[bytes]) -> None:
        server.inject(BULK_EVENTS, *[Fault.forbidden()] * 50)  # the key lost its scope

    code, delivered = _run(emulator, subscription, dead, log, refuse)
    err = log.read_text()
    assert code == 1, err
    [line] = [line for line in err.splitlines() if line.startswith("walkeros-klaviyo run:")]
    assert "the job failed" in line and "delivered again by the next run" in line
    assert KlaviyoTestServer().api_key not in err and "Traceback" not in err
    remaining = _remaining(subscription)
    assert delivered | remaining == {f"ev-{index:04d}" for index in range(EVENTS)}, err


class _FakeSubscriber:
    """Records what the leases ask Pub/Sub to do."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.deadlines: list[tuple[tuple[str, ...], int]] = []

    def acknowledge(self, *, subscription: str, ack_ids: list[str]) -> None:
        self.acked += ack_ids

    def modify_ack_deadline(self, *, subscription: str, ack_ids: list[str],
                            ack_deadline_seconds: int) -> None:
        self.deadlines.append((tuple(ack_ids), ack_deadline_seconds))


def test_a_message_is_acknowledged_only_after_every_stage_took_it_and_it_settled() -> None:
    now = [100.0]
    client = _FakeSubscriber()
    leases = Leases(client, "projects/p/subscriptions/s", clock=lambda: now[0])
    leases.add(["a", "b"])
    assert client.deadlines == [(("a", "b"), LEASE_SECONDS)]  # leased at once
    leases.acknowledge_settled()
    assert client.acked == []  # not yet taken by every stage
    leases.taken(settle_seconds=30)
    leases.add(["c"])  # pulled after: its own settle time starts when it is taken
    now[0] = 129.0
    leases.acknowledge_settled()
    assert client.acked == []
    now[0] = 130.0
    leases.acknowledge_settled()
    assert client.acked == ["a", "b"] and leases.outstanding() == 1
    assert leases.release() == 1 and client.deadlines[-1] == (("c",), 0)  # handed back
    assert leases.acknowledge_all() == 0


def test_the_job_finished_acknowledges_what_is_still_leased() -> None:
    client = _FakeSubscriber()
    leases = Leases(client, "projects/p/subscriptions/s")
    leases.add(["a"])
    assert leases.acknowledge_all() == 1 and client.acked == ["a"]
