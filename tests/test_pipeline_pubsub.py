"""The streaming job end to end against gcloud's Pub/Sub emulator on a free loopback port.

`python -m pipeline --input_subscription … --dry_run --dead_letter_topic …` runs in a subprocess
(BundleBasedDirectRunner, picked by the job itself): a streaming job never ends by itself, and a
subprocess can be stopped at once, whereas cancelling the runner waits for its 30 s Pub/Sub
pull (beam.md §1.4). The test reads the planned calls from its stdout and the dead letters from
a subscription of the dead-letter topic, then stops it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from google.cloud import pubsub_v1

ROOT = Path(__file__).parents[1]
PROJECT = "walkeros-test"
DEADLINE_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[Any]) -> None:
    """Stop a process started here in its own session, with everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud is not installed: this test runs `gcloud beta emulators pubsub`")
    host = f"127.0.0.1:{_free_port()}"
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port={host}"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}/", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Pub/Sub emulator did not start:\n{log.read_text()}")
                time.sleep(0.2)
        yield host
    finally:
        _stop(process)


def _lines(stream: IO[str]) -> queue.Queue[str]:
    """The lines of `stream` as they come, read by a thread so that waiting can time out."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def start_job(emulator: str, log: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m pipeline ARGS` against the emulator, in its own session (see `_stop`), with
    its stdout piped and its log in `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT, env={**os.environ, "PUBSUB_EMULATOR_HOST": emulator},
        stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True, start_new_session=True)


def _event(**fields: Any) -> bytes:
    return json.dumps({"consent": {"marketing": True}, **fields}).encode("utf-8")


def test_pubsub_to_dry_run_and_dead_letter_topic(
    emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topics = {name: publisher.topic_path(PROJECT, name) for name in ("events", "dead")}
    subscriptions = {name: subscriber.subscription_path(PROJECT, name)
                     for name in ("events", "dead")}
    for name in topics:
        publisher.create_topic(name=topics[name])
        subscriber.create_subscription(name=subscriptions[name], topic=topics[name])

    example = (ROOT / "examples" / "events.jsonl").read_text(encoding="utf-8").splitlines()
    # page view (ignored), user login (an upsert), 2 product views, product add, order
    # complete: 5 calls; then an event without id and timestamp (D4, D5): 1 call.
    valid = [line.encode("utf-8") for line in example[:6]]
    no_id = _event(name="product view", data={"id": "cc"}, user={"id": "u-2000"})
    published = {data: publisher.publish(topics["events"], data, src="test").result()
                 for data in [*valid, no_id, b"{not json", b"\xff\xfe"]}

    process = start_job(emulator, tmp_path / "job.log",
                        "--input_subscription", subscriptions["events"],
                        "--config", str(ROOT / "examples" / "flow.json"), "--dry_run",
                        "--dead_letter_topic", topics["dead"])
    try:
        deadline = time.monotonic() + DEADLINE_S
        output = _lines(process.stdout)  # type: ignore[arg-type]
        calls: list[dict[str, Any]] = []
        while len(calls) < 6:
            assert process.poll() is None, (tmp_path / "job.log").read_text()
            try:
                calls.append(json.loads(output.get(timeout=max(0.1, deadline - time.monotonic()))))
            except queue.Empty:
                pytest.fail(f"{len(calls)} calls before the deadline: {calls}")
        letters: list[Any] = []
        while len(letters) < 2 and time.monotonic() < deadline:
            response = subscriber.pull(subscription=subscriptions["dead"], max_messages=10,
                                       timeout=10)
            letters += [received.message for received in response.received_messages]
    finally:
        _stop(process)

    assert sorted(c["method"] for c in calls) == ["create_event"] * 5 + [
        "create_or_update_profile"]
    [from_no_id] = [c for c in calls if c["method"] == "create_event" and c["body"]["data"]
                    ["attributes"]["profile"]["data"]["attributes"]["external_id"] == "u-2000"]
    assert from_no_id["event_id"] == published[no_id]  # the Pub/Sub message id (D4)

    assert len(letters) == 2
    records = {record["message_id"]: record for record in
               (json.loads(letter.data) for letter in letters)}
    assert all(letter.attributes["stage"] == "parse" for letter in letters)
    bad_json = records[published[b"{not json"]]
    assert bad_json["payload"] == "{not json" and bad_json["attributes"] == {"src": "test"}
    assert bad_json["reason"].startswith("invalid JSON")
    not_utf8 = records[published[b"\xff\xfe"]]
    assert not_utf8["payload_encoding"] == "base64" and not_utf8["payload"] == "//4="
