"""Replaying dead letters keeps the id and time the first run planned with (no duplicates)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pipeline.replay import main, replay_of, unique_messages
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
