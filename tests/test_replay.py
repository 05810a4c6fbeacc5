"""Replaying dead letters keeps the id and time the first run planned with (no duplicates)."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline.replay import main, replay_of, unique_messages
from tests.test_pipeline_pubsub import emulator  # noqa: F401 - the emulator fixture
from transforms.klaviyo.plan import Planner

NOW = 1_764_400_000_000


def record(payload: bytes, **fields: object) -> dict[str, object]:
    return {"stage": "sink", "reason": "503", "payload": payload.decode(),
            "payload_encoding": "utf-8", "attributes": {"src": "web"}} | fields


def test_a_replayed_event_plans_the_same_unique_id_and_time() -> None:
    original = {"name": "order complete", "user": {"id": "u1"}}  # no id, no timestamp
    payload = json.dumps(original).encode()
    first = Planner({}).plan(payload, now_ms=NOW, message_id="m-77",
                             publish_time_ms=1_764_300_000_000)
    dead = record(payload, event_id=first.event_id, message_id="m-77",
                  publish_time="2025-11-28T03:20:00.000Z")
    replay = replay_of(dead)
    again = Planner({}).plan(replay.payload, now_ms=NOW + 10_000)  # a new message id, later
    assert again.event.body == first.event.body
    assert replay.attributes == {"src": "web"}


def test_events_with_their_own_id_and_unparseable_payloads_replay_unchanged() -> None:
    own = json.dumps({"name": "a b", "id": "x", "timestamp": 5}).encode()
    assert replay_of(record(own, event_id="x")).payload == own
    broken = base64.b64encode(b"\xff\x00").decode()
    raw = {"stage": "parse", "payload": broken, "payload_encoding": "base64"}
    assert replay_of(raw).payload == b"\xff\x00"


def test_one_replay_per_message() -> None:
    payload = b'{"name": "a b"}'
    records = [record(payload, event_id="e", message_id="m", stage="preflight"),
               record(payload, event_id="e", message_id="m"),
               record(payload, event_id="f", message_id="n")]
    assert len(list(unique_messages(records))) == 2


def test_replay_files_by_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = tmp_path / "dead-00000-of-00001.jsonl"
    lines = [record(b'{"name": "a b", "id": "1"}', stage="sink"),
             record(b'{"name": "a b", "id": "2"}', stage="parse")]
    dead.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    assert main(["--dead_letters", str(tmp_path / "dead-*"), "--output", str(out),
                 "--stage", "sink"]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1"]
    assert "replayed 1 message(s)" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (None, "no files match"),
    ('{"name": "page view", "id": "1"}\n', "line 1 is not a dead letter"),
    ("not json\n", "line 1 is not JSON"),
])
def test_bad_replay_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "dead-1.jsonl").write_text(content, encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    assert main(["--dead_letters", str(tmp_path / "dead-*"), "--output", str(out)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("walkeros-klaviyo replay: ") and message in line
    assert not out.exists() or not out.read_bytes()  # nothing replayed


def test_replay_from_a_subscription_acks_what_it_forwarded_and_ends(
        emulator: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    paths = {name: (publisher.topic_path("walkeros-replay", name),
                    subscriber.subscription_path("walkeros-replay", name))
             for name in ("dead-letters", "events")}
    for topic, subscription in paths.values():
        publisher.create_topic(name=topic)
        # A short ack deadline: a loop that does not acknowledge sees its messages again.
        subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=10)
    dead_topic, dead_subscription = paths["dead-letters"]
    sink = [record(json.dumps({"name": "a b", "id": f"s{i}"}).encode(), message_id=f"m{i}",
                   event_id=f"s{i}") | ({"ordering_key": "user-1"} if i % 2 else {})
            for i in range(120)]
    parse = [record(b"{broken", stage="parse", message_id=f"p{i}") for i in range(30)]
    duplicate = dict(sink[0], stage="preflight")  # another call of the same message
    for letter in [*sink, *parse, duplicate]:
        publisher.publish(dead_topic, json.dumps(letter).encode(), stage=letter["stage"]).result()

    events_topic, events_subscription = paths["events"]
    assert _replay_ends(["--dead_letter_subscription", dead_subscription, "--topic",
                         events_topic, "--stage", "sink", "--stage", "preflight"]) == 0
    assert "replayed 120 message(s) from 121 dead letter(s)" in capsys.readouterr().err

    replayed = _drain(subscriber, events_subscription)
    assert sorted(json.loads(m.data)["id"] for m in replayed) == sorted(f"s{i}" for i in range(120))
    assert all(m.attributes["src"] == "web" for m in replayed)
    keys = {json.loads(m.data)["id"]: m.ordering_key for m in replayed}
    assert keys["s1"] == "user-1" and keys["s2"] == ""

    # Only the parse dead letters are left, at once (handed back, not waiting for a deadline).
    assert _replay_ends(["--dead_letter_subscription", dead_subscription, "--topic",
                         events_topic, "--stage", "parse"]) == 0
    assert "replayed 30 message(s) from 30 dead letter(s)" in capsys.readouterr().err
    assert not _drain(subscriber, dead_subscription)


def _replay_ends(argv: list[str]) -> int | None:
    """`replay`'s exit code; None if it is still running after a generous deadline (the
    loop that never ends, issue 10)."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    thread.join(timeout=120)
    return codes[0] if codes else None


def _topic(host: str, monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[Any, str, str]:
    """(a subscriber, a new topic on the emulator, its new subscription)."""
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path("walkeros-replay", name)
    subscription = subscriber.subscription_path("walkeros-replay", name)
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    return subscriber, topic, subscription


def _drain(subscriber: Any, subscription: str) -> list[Any]:
    """Every message on `subscription`, acknowledged."""
    messages: list[Any] = []
    while True:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=5)
        if not response.received_messages:
            return messages
        messages += [received.message for received in response.received_messages]
        subscriber.acknowledge(subscription=subscription,
                               ack_ids=[r.ack_id for r in response.received_messages])


@pytest.mark.parametrize("data", [
    '{"text": "\\ud800"}',  # a lone surrogate escape: parsed by the standard library
    '{"big": 1e400}',  # a number orjson refuses as infinite: parsed by the standard library
    '{"n": 1.0}, "timestamp": 0',  # a 0 timestamp takes the publish time, as at first
])
def test_a_replayed_event_without_id_and_time_still_parses(data: str) -> None:
    from transforms.dead_letters import DeadLetterRecord
    from transforms.elements import Envelope
    from transforms.walkeros.event import InvalidEvent, parse_event

    payload = f'{{"name": "a b", "user": {{"id": "u1"}}, "data": {data}}}'.encode()
    original = parse_event(payload)
    assert not isinstance(original, InvalidEvent)  # the first run took it
    dead = DeadLetterRecord("sink", "503", 0.0, Envelope(
        payload, message_id="m-1", publish_time_ms=1_764_300_000_000)).to_json()
    again = parse_event(replay_of(dead).payload)
    assert not isinstance(again, InvalidEvent), again.reason
    assert json.dumps(again["data"]) == json.dumps(original["data"])
    assert (again["id"], again["timestamp"]) == ("m-1", 1_764_300_000_000)


def test_a_replay_is_published_with_every_original_attribute(
        emulator: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # Attribute names are the publisher's choice (settings.attributes of the walkerOS Pub/Sub
    # destination); some are also the names of the client's publish() parameters.
    from pipeline.replay import Replay, Target

    subscriber, topic, subscription = _topic(emulator, monkeypatch, "attributes")
    attributes = {"src": "web", "timeout": "30", "retry": "no", "data": "d", "topic": "t",
                  "ordering_key": "o"}
    problems = []
    for name, value in attributes.items():
        target = Target(topic, None)
        try:
            target.write(Replay(f'{{"name": "a b", "id": "{name}"}}'.encode(),
                                {name: value}, "user-1"))
            target.close()
        except Exception as error:  # noqa: BLE001 - each name's failure is reported
            problems.append(f"{name}: {type(error).__name__}: {error}")
    received = {json.loads(m.data)["id"]: m for m in _drain(subscriber, subscription)}
    assert set(received) == set(attributes), sorted(received)
    for name, value in attributes.items():
        if dict(received[name].attributes) != {name: value}:
            problems.append(f"{name}: published with {dict(received[name].attributes)}")
    assert not problems


def test_a_replayed_line_without_timestamp_plans_the_same_time() -> None:
    """A line of a file has no publish time: the plan stage keeps the processing time its
    event was planned at in the envelope, which every later dead letter carries."""
    from transforms.dead_letters import DeadLetterRecord
    from transforms.elements import Envelope, ParsedEvent
    from transforms.plan import _PlanFn
    from transforms.walkeros.event import parse_event

    payload = json.dumps({"name": "order complete", "user": {"id": "u1"}}).encode()
    plan_stage = _PlanFn({}, clock=lambda: NOW / 1000)
    plan_stage.setup()
    [first] = plan_stage.process(ParsedEvent(Envelope(payload), parse_event(payload)))
    assert first.plan.event is not None
    dead = DeadLetterRecord("sink", "503", NOW + 5_000, first.envelope, first.plan.event_id,
                            first.plan.event).to_json()
    again = Planner({}).plan(replay_of(dead).payload, now_ms=NOW + 3_600_000)  # replayed later
    assert again.event is not None
    assert again.event.body == first.plan.event.body


def test_dead_letters_of_events_whose_id_is_not_text_replay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # walkerOS does not check an event's id: the pipeline plans one that is an object or a
    # list (with no unique_id), and its dead letters carry it as their event_id.
    dead = tmp_path / "dead-00000-of-00001.jsonl"
    ids: list[Any] = [{"a": 1}, [1, 2], 3, {"a": 1}]
    lines = [record(json.dumps({"name": "a b", "id": event_id}).encode(), event_id=event_id,
                    message_id=f"m{n}") for n, event_id in enumerate(ids)]
    lines.append(dict(lines[0], stage="preflight"))  # another call of the first message
    dead.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    assert main(["--dead_letters", str(dead), "--output", str(out)]) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ids
    assert "replayed 4 message(s) from 5 dead letter(s)" in capsys.readouterr().err


def test_a_replayed_publish_time_is_the_millisecond_written() -> None:
    # 2038-02-15T...: parsed back by datetime.timestamp() * 1000 it was 0.0002 ms short, and
    # the replayed event's time (cut to the millisecond) one millisecond earlier.
    from transforms.klaviyo.wire import iso_time

    published = 2_149_725_752_759
    payload = b'{"name": "a b", "id": "x"}'
    replayed = json.loads(replay_of(record(payload, publish_time=iso_time(published))).payload)
    assert replayed["timestamp"] == published


def test_a_replay_gets_a_fresh_value_of_the_jobs_id_attribute() -> None:
    """Dataflow drops a message whose `--input_id_attribute` value it saw lately: a replay
    soon after the first delivery would be dropped unseen. With the job's attribute named,
    each replay run gives it a value of its own; the event keeps its id in the payload."""
    dead = record(b'{"name": "a b", "id": "e-1"}', attributes={"event_id": "e-1", "src": "web"})

    first, second = (replay_of(dead, id_attribute="event_id", run=run) for run in ("r1", "r2"))
    plain = replay_of(dead)

    assert first.attributes == {"event_id": "e-1~replay-r1", "src": "web"}
    assert second.attributes["event_id"] != first.attributes["event_id"]
    assert plain.attributes == {"event_id": "e-1", "src": "web"}
    assert first.payload == plain.payload
    assert replay_of(record(b"{}"), id_attribute="event_id", run="r1").attributes == \
        {"src": "web"}  # no value to repeat: nothing added


def test_the_id_attribute_is_refused_without_a_topic(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = tmp_path / "dead.jsonl"
    dead.write_text(json.dumps(record(b'{"name": "a b"}')) + "\n")

    code = main(["--dead_letters", str(dead), "--output", str(tmp_path / "out.jsonl"),
                 "--input_id_attribute", "event_id"])

    assert code == 2
    assert "--input_id_attribute is for replays to a --topic" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_replays_id_value_stays_within_pub_subs_limit() -> None:
    """Pub/Sub refuses an attribute value over 1024 bytes (InvalidArgument): an original value
    near the limit, or one that grew over replays of replays, must still make a value that
    publishes, fresh per run and distinct for distinct originals."""
    long_values = ["x" * 1024, "é" * 512, "x" * 1010 + "a", "x" * 1010 + "b"]
    dead = [record(b'{"name": "a b", "id": "e"}', attributes={"event_id": value})
            for value in long_values]

    runs = [[replay_of(letter, id_attribute="event_id", run=run).attributes["event_id"]
             for letter in dead] for run in ("r1", "r2")]

    for values in runs:
        assert all(len(value.encode("utf-8")) <= 1024 for value in values), \
            [len(value.encode("utf-8")) for value in values]
        assert len(set(values)) == len(values)
    assert not set(runs[0]) & set(runs[1])
    again = record(b'{"name": "a b", "id": "e"}', attributes={"event_id": "e-1"})
    for run in range(60):  # a message dead-lettered and replayed again and again
        value = replay_of(again, id_attribute="event_id", run=f"{run:012x}").attributes[
            "event_id"]
        assert len(value.encode("utf-8")) <= 1024
        again = dict(again, attributes={"event_id": value})


def test_the_id_attribute_is_refreshed_on_the_topic_whatever_its_name(
        emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """`replay --dead_letters … --topic … --input_id_attribute NAME` end to end: NAME may be a
    publish() parameter's name (published by the API call), a message without it gets none."""
    subscriber, topic, subscription = _topic(emulator, monkeypatch, "ids")
    letters = [record(b'{"name": "a b", "id": "e-1"}', message_id="m1",
                      attributes={"timeout": "e-1", "src": "web"}),
               record(b'{"name": "a b", "id": "e-2"}', message_id="m2",
                      attributes={"timeout": "t" * 1020}),
               record(b'{"name": "a b", "id": "e-3"}', message_id="m3", attributes={})]
    dead = tmp_path / "dead.jsonl"
    dead.write_text("".join(json.dumps(letter) + "\n" for letter in letters))

    assert main(["--dead_letters", str(dead), "--topic", topic,
                 "--input_id_attribute", "timeout"]) == 0, capsys.readouterr().err

    received = {json.loads(m.data)["id"]: dict(m.attributes)
                for m in _drain(subscriber, subscription)}
    assert set(received) == {"e-1", "e-2", "e-3"}
    first = received["e-1"]
    assert first["src"] == "web" and first["timeout"].startswith("e-1~replay-")
    assert len(received["e-2"]["timeout"].encode()) <= 1024
    assert received["e-3"] == {}
