"""`replay`: send dead letters back through the pipeline after a fix, without duplicates.

A dead-letter record keeps the original payload, its Pub/Sub attributes, the event id the
pipeline used and the message's publish time. Replaying re-publishes (or re-writes) the original
event with the id and time it was planned with written into it when the event had none, so the
replay plans the same `unique_id` and `time` as the first run did: whatever was delivered then
(the profile upsert of an event whose event call failed, say) is deduplicated by Klaviyo or
skipped by the identify state, and only what was missing arrives.

Sources: dead-letter files (`--dead_letter_path` output, any Beam filesystem: local or gs://),
or a Pub/Sub subscription on the dead-letter topic (pulled until empty; acknowledged only after
the replayed copy is written). Targets: a JSON Lines file for `run --input`, or the streaming
job's input topic.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from transforms.walkeros.event import fallback_event_id


@dataclass(frozen=True)
class Replay:
    """One message to send again."""

    payload: bytes
    attributes: dict[str, str]


def decode_payload(record: dict[str, Any]) -> bytes:
    """The original message bytes of a dead-letter record."""
    payload = record.get("payload") or ""
    if record.get("payload_encoding") == "base64":
        return base64.b64decode(payload)
    return str(payload).encode("utf-8", "surrogatepass")


def _publish_time_ms(record: dict[str, Any]) -> float | None:
    text = record.get("publish_time")
    if not text:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000


def replay_of(record: dict[str, Any]) -> Replay:
    """The message to replay for one dead-letter record (module docstring)."""
    payload = decode_payload(record)
    attributes = dict(record.get("attributes") or {})
    try:
        event = json.loads(payload)
    except ValueError:
        return Replay(payload, attributes)  # still not an event: replayed as it was
    if not isinstance(event, dict):
        return Replay(payload, attributes)
    changed = False
    if "id" not in event:
        event["id"] = record.get("event_id") or fallback_event_id(event, record.get("message_id"))
        changed = True
    publish_time = _publish_time_ms(record)
    if not event.get("timestamp") and publish_time is not None:
        event["timestamp"] = publish_time
        changed = True
    if not changed:
        return Replay(payload, attributes)
    return Replay(json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                  attributes)


def unique_messages(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One record per original message, even when several of its calls were dead-lettered
    (the replay plans all of them again)."""
    seen: set[tuple[Any, ...]] = set()
    for record in records:
        identity = (record.get("message_id"), record.get("event_id"), record.get("payload"))
        if identity in seen:
            continue
        seen.add(identity)
        yield record


def _read_files(pattern: str) -> Iterator[dict[str, Any]]:
    from apache_beam.io.filesystems import FileSystems

    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


def _pull(subscription: str) -> Iterator[tuple[dict[str, Any], Any]]:
    """(record, ack callback) pairs until the subscription is empty."""
    import google.cloud.pubsub_v1 as pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    while True:
        response = subscriber.pull(subscription=subscription, max_messages=500, timeout=30)
        if not response.received_messages:
            return
        for received in response.received_messages:
            def ack(ack_id: str = received.ack_id) -> None:
                subscriber.acknowledge(subscription=subscription, ack_ids=[ack_id])
            yield json.loads(received.message.data), ack


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="walkeros-klaviyo replay",
        description="Send dead letters back through the pipeline (see README: Replay).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dead_letters", help="dead-letter files (a glob; local or gs://)")
    source.add_argument("--dead_letter_subscription",
                        help="projects/P/subscriptions/S on the dead-letter topic")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="JSON Lines file for `run --input` (- for stdout)")
    target.add_argument("--topic", help="projects/P/topics/T: the streaming job's input topic")
    parser.add_argument("--stage", action="append", dest="stages",
                        choices=("parse", "plan", "identify_state", "preflight", "sink"),
                        help="replay only these stages (repeatable; default: all)")
    args = parser.parse_args(argv)

    acks: dict[int, Any] = {}
    if args.dead_letters:
        records: Iterable[dict[str, Any]] = _read_files(args.dead_letters)
    else:
        pulled = list(_pull(args.dead_letter_subscription))
        records = [record for record, _ in pulled]
        acks = {id(record): ack for record, ack in pulled}

    if args.topic:
        import google.cloud.pubsub_v1 as pubsub_v1

        publisher = pubsub_v1.PublisherClient()

        def write(replay: Replay) -> None:
            publisher.publish(args.topic, replay.payload, **replay.attributes).result()
        close = None
    else:
        handle = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")

        def write(replay: Replay) -> None:
            handle.write(replay.payload.replace(b"\n", b" ") + b"\n")
        close = handle

    matching = [record for record in records
                if not args.stages or record.get("stage") in args.stages]
    replayed = 0
    for record in unique_messages(matching):
        write(replay_of(record))
        replayed += 1
    if close is not None and close is not sys.stdout.buffer:
        close.close()
    for record in matching:  # acknowledged only once replayed; other stages stay queued
        ack = acks.get(id(record))
        if ack:
            ack()
    print(f"replayed {replayed} message(s) from {len(matching)} dead letter(s)", file=sys.stderr)
    return 0
