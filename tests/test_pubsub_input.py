"""Pub/Sub input: large messages (emulator), the ordering key through dead letters, mapped
payloads, and `--input_id_attribute` (Beam's id_label) on Dataflow and on a local runner."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import time
from pathlib import Path
from typing import Any

import apache_beam as beam
import grpc
import pytest
from apache_beam.io.gcp.pubsub import ReadFromPubSub
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from pipeline.assembly import build
from pipeline.cli import main as cli_main
from pipeline.options import job_settings
from tests.test_pipeline_pubsub import _lines, _stop, emulator, start_job  # noqa: F401 - fixture
from transforms.parse import MAPPED_PAYLOAD_HINT

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "examples" / "flow.json")
PROJECT = "walkeros-test"
SUBSCRIPTION = f"projects/{PROJECT}/subscriptions/events"
DEADLINE_S = 120


def _big_subscriber(host: str) -> pubsub_v1.SubscriberClient:
    """A client of the test itself that can pull the big dead letter (gRPC's default is 4 MB)."""
    channel = grpc.insecure_channel(host, options=[("grpc.max_receive_message_length", -1)])
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


def test_a_message_over_4_mb_is_pulled_and_its_dead_letter_keeps_the_ordering_key(
    emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path  # noqa: F811
) -> None:
    """The walkerOS GCP destination with a `data` mapping and an `orderingKey`: a 5.2 MB mapped
    payload (over gRPC's 4 MB default, under Pub/Sub's 10 MB), a whole event, and a 7.6 MB
    message that is not UTF-8, whose base64 alone would not fit in a Pub/Sub message."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
    subscriber = _big_subscriber(emulator)
    topics = {name: publisher.topic_path(PROJECT, name) for name in ("events", "dead")}
    subscriptions = {name: subscriber.subscription_path(PROJECT, name) for name in topics}
    for name in topics:
        publisher.create_topic(name=topics[name])
        subscriber.create_subscription(name=subscriptions[name], topic=topics[name])

    mapped = json.dumps({"order_id": "ORD-500", "note": "x" * 5_200_000}).encode()
    whole = json.dumps({"name": "product view", "id": "e-1", "data": {"id": "a"},
                        "user": {"id": "u-1"}, "consent": {"marketing": True}}).encode()
    big_id = publisher.publish(topics["events"], mapped, ordering_key="usr-789",
                               entity="order").result()
    publisher.publish(topics["events"], whole, ordering_key="u-1").result()
    huge = b"\xff" + b"x" * 7_600_000
    huge_id = publisher.publish(topics["events"], huge).result()

    process = start_job(emulator, tmp_path / "job.log",
                        "--input_subscription", subscriptions["events"], "--config", CONFIG,
                        "--dry_run", "--dead_letter_topic", topics["dead"])
    try:
        deadline = time.monotonic() + DEADLINE_S
        output = _lines(process.stdout)  # type: ignore[arg-type]
        try:
            call = json.loads(output.get(timeout=DEADLINE_S))
        except queue.Empty:
            pytest.fail(f"no call before the deadline:\n{(tmp_path / 'job.log').read_text()}")
        letters: list[Any] = []
        while len(letters) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "job.log").read_text()
            response = subscriber.pull(subscription=subscriptions["dead"], max_messages=10,
                                       timeout=10)
            letters += [received.message for received in response.received_messages]
    finally:
        _stop(process)

    assert call["event_id"] == "e-1"
    records = {record["message_id"]: record for record in
               (json.loads(letter.data) for letter in letters)}
    cut = records[huge_id]["truncated"]["payload"]
    assert cut["bytes"] == len(huge) and cut["sha256"] == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(base64.b64decode(records[huge_id]["payload"]))
    record = records[big_id]
    assert record["payload"] == mapped.decode()
    assert record["ordering_key"] == "usr-789" and record["attributes"] == {"entity": "order"}
    assert record["truncated"] is None
    assert record["reason"] == ("name must be a non-empty string 'entity action', got missing: "
                                + MAPPED_PAYLOAD_HINT)


def _settings(*extra: str) -> Any:
    return job_settings(PipelineOptions(["--input_subscription", SUBSCRIPTION, "--config",
                                         CONFIG, "--dry_run_output=-",
                                         "--dead_letter_path", "/tmp/unused", *extra]))


def test_id_attribute_reaches_dataflow_as_id_label() -> None:
    """What Dataflow reads: the Pub/Sub read's `id_attribute` in the job graph."""
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming"]))
    build(pipeline, _settings("--input_id_attribute", "event_id"),
          {"settings": {}, "mapping": {}}, "DataflowRunner")
    [payload] = [beam_runner_api_pb2.PubSubReadPayload.FromString(t.spec.payload)
                 for t in pipeline.to_runner_api().components.transforms.values()
                 if t.spec.urn == "beam:transform:pubsub_read:v1"]
    assert payload.id_attribute == "event_id" and payload.subscription == SUBSCRIPTION


def test_local_runner_cannot_deduplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why a local run refuses the option: Beam's own local Pub/Sub reader raises as soon as
    the job runs (BundleBasedDirectRunner, 2.77)."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")  # never contacted
    pipeline = beam.Pipeline(runner=BundleBasedDirectRunner(),
                             options=PipelineOptions(["--streaming"]))
    _ = pipeline | ReadFromPubSub(subscription=SUBSCRIPTION, id_label="event_id")
    with pytest.raises(NotImplementedError, match="id_label is not supported"):
        pipeline.run().wait_until_finish()


def test_local_run_with_id_attribute_is_refused_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["run", "--input_subscription", SUBSCRIPTION, "--config", CONFIG,
                     "--dry_run", "--dead_letter_path", "/tmp/unused",
                     "--input_id_attribute", "event_id"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "walkeros-klaviyo run: --input_id_attribute needs Dataflow: the local runner "
        "BundleBasedDirectRunner cannot de-duplicate Pub/Sub messages by attribute"]


def test_id_attribute_is_for_pubsub_input(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["run", "--input", str(ROOT / "examples" / "events.jsonl"), "--config",
                     CONFIG, "--dry_run", "--dead_letter_path", "/tmp/unused",
                     "--input_id_attribute", "event_id"])
    assert code == 2
    assert "--input_id_attribute is for Pub/Sub input" in capsys.readouterr().err
