"""`replay`: send dead letters back through the pipeline after a fix, without duplicates.

A dead-letter record keeps the original payload, its Pub/Sub attributes, the event id the
pipeline used and the message's publish time. Replaying re-publishes (or re-writes) the original
event with the id and time it was planned with written into it when the event had none, so the
replay plans the same `unique_id` and `time` as the first run did: whatever was delivered then
(the profile upsert of an event whose event call failed, say) is deduplicated by Klaviyo or
skipped by the identify state, and only what was missing arrives.

Sources: dead-letter files (`--dead_letter_path` output, any Beam filesystem: local or gs://),
or a Pub/Sub subscription on the dead-letter topic (pulled until drained; each dead letter is
acknowledged only once its replay was published or written, the ones of other stages are handed
back). Targets: a JSON Lines file for `run --input`, or the streaming job's input topic, with
the original attributes and ordering key. Input that is not dead letters is refused before
anything is written.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, BinaryIO

from transforms.dead_letters import STAGES
from transforms.walkeros.event import fallback_event_id


@dataclass(frozen=True)
class Replay:
    """One message to send again."""

    payload: bytes
    attributes: dict[str, str]
    ordering_key: str | None = None  # the original message's, kept so that order holds


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
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if moment.tzinfo is None:  # the dead letters write UTC with a Z
        moment = moment.replace(tzinfo=UTC)
    # Whole microseconds, then ms: `timestamp() * 1000` can fall short of the millisecond
    # written (2149725752758.9998), which the replayed event's time is then cut to.
    return (moment - _EPOCH) // timedelta(microseconds=1) / 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def replay_of(record: dict[str, Any], *, id_attribute: str | None = None,
              run: str = "") -> Replay:
    """The message to replay for one dead-letter record (module docstring).

    `id_attribute`: the job's `--input_id_attribute`. Dataflow drops a message whose value of
    it was seen lately (Beam's `id_label`: publisher retries), so a replay soon after the first
    delivery would be dropped unseen. The replay's value is the original one with `~replay-`
    and the replay `run`'s token after it (`fresh_id`); the event keeps its id in the payload,
    so what Klaviyo deduplicates by does not change."""
    original = decode_payload(record)
    attributes = dict(record.get("attributes") or {})
    if id_attribute and id_attribute in attributes:
        attributes[id_attribute] = fresh_id(attributes[id_attribute], run)
    ordering_key = record.get("ordering_key") or None
    return Replay(_with_planned_id_and_time(original, record), attributes, ordering_key)


ATTRIBUTE_VALUE_LIMIT = 1024  # bytes: Pub/Sub refuses a longer attribute value


def fresh_id(value: str, run: str) -> str:
    """`value~replay-run`; when that would pass Pub/Sub's limit (a value near it, or one grown
    by replays of replays), the SHA-256 of `value` stands in for it: still one value per
    original and run."""
    fresh = f"{value}~replay-{run}"
    if len(fresh.encode("utf-8")) <= ATTRIBUTE_VALUE_LIMIT:
        return fresh
    return f"{hashlib.sha256(value.encode('utf-8')).hexdigest()}~replay-{run}"


def _with_planned_id_and_time(payload: bytes, record: dict[str, Any]) -> bytes:
    try:
        event = json.loads(payload.decode("utf-8"))  # UTF-8 only, as the pipeline reads it
    except ValueError:  # UnicodeDecodeError too
        return payload  # still not an event: replayed as it was
    if not isinstance(event, dict):
        return payload
    added: dict[str, Any] = {}
    if "id" not in event:
        added["id"] = record.get("event_id") or fallback_event_id(event, record.get("message_id"))
    publish_time = _publish_time_ms(record)
    if not event.get("timestamp") and publish_time is not None:
        added["timestamp"] = publish_time
    if not added:
        return payload
    return _with_members(payload, added, empty=not event)


def _with_members(payload: bytes, added: dict[str, Any], *, empty: bool) -> bytes:
    """The JSON object `payload` with `added` written in before its closing brace, every
    byte of the original kept. Re-writing the parsed event instead would change what the
    standard library read and orjson refuses (a lone surrogate escape became bytes that are
    not UTF-8, `1e400` became `Infinity`): the replay would be a parse dead letter. Last in
    the object, a member wins over an earlier one of the same name (`"timestamp": 0`)."""
    body = payload.rstrip(b" \t\r\n")  # a JSON object, so it ends with its closing brace
    members = ",".join(f"{json.dumps(name)}:{json.dumps(value)}"
                       for name, value in added.items())
    return body[:-1] + (b"" if empty else b",") + members.encode("ascii") + b"}"


def unique_messages(records: Iterable[dict[str, Any]],
                    seen: set[tuple[Any, ...]] | None = None) -> Iterator[dict[str, Any]]:
    """One record per original message, even when several of its calls were dead-lettered
    (the replay plans all of them again); `seen` carries across calls."""
    seen = set() if seen is None else seen
    for record in records:
        # The event id as JSON text: an event's own id may be an object or a list (unhashable).
        identity = (record.get("message_id"), json.dumps(record.get("event_id"), sort_keys=True),
                    record.get("payload"))
        if identity in seen:
            continue
        seen.add(identity)
        yield record


class ReplayError(ValueError):
    """Replay input that cannot be replayed; the message says which and why."""


def check_record(record: Any, where: str) -> dict[str, Any]:
    """`record` if it is a dead letter this pipeline wrote, else a `ReplayError`."""
    if not isinstance(record, dict) or record.get("stage") not in STAGES or not isinstance(
            record.get("payload"), str):
        raise ReplayError(f"{where} is not a dead letter (a JSON object with a stage "
                          f"{'/'.join(STAGES)} and a payload)")
    return record


def read_files(pattern: str) -> Iterator[dict[str, Any]]:
    """Every dead letter in the files matching `pattern`; an error when none match."""
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([pattern])[0].metadata_list
    if not matches:
        raise ReplayError(f"no files match {pattern}")
    for match in matches:
        with FileSystems.open(match.path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{match.path} line {number}"
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ReplayError(f"{where} is not JSON") from None
                yield check_record(record, where)


@dataclass(frozen=True)
class Pulled:
    """A dead letter pulled from the subscription."""

    record: dict[str, Any]
    ack_id: str
    message_id: str  # the dead-letter message's own id


LEASE_SECONDS = 600  # Pub/Sub's longest ack deadline: a skipped message stays out of the way
EMPTY_PULLS_TO_END = 2  # Pub/Sub may answer a pull empty while messages wait: ask twice
PULL_TIMEOUT_S = 5.0


class SubscriptionSource:
    """Dead letters pulled from a subscription until it is drained.

    A forwarded dead letter is acknowledged once its replay was written (`forwarded`). One of
    a stage not asked for stays leased for the rest of the run, so that it is not pulled again
    and the loop ends, and is handed back (`close`) for a later replay."""

    def __init__(self, subscription: str) -> None:
        import google.cloud.pubsub_v1 as pubsub_v1

        self.subscription = subscription
        self.client = pubsub_v1.SubscriberClient()
        self._skipped: dict[str, str] = {}  # message id → ack id

    def batches(self) -> Iterator[list[Pulled]]:
        """One list per pull, until pulls come back empty."""
        from google.api_core.exceptions import DeadlineExceeded

        empty = 0
        while empty < EMPTY_PULLS_TO_END:
            try:
                response = self.client.pull(subscription=self.subscription, max_messages=500,
                                            timeout=PULL_TIMEOUT_S, retry=None)
            except DeadlineExceeded:  # nothing came within the timeout
                empty += 1
                continue
            fresh = []
            for received in response.received_messages:
                if received.message.message_id in self._skipped:  # back after 600 s
                    self.skip(received.message.message_id, received.ack_id)
                else:
                    fresh.append(received)
            empty = 0 if fresh else empty + 1
            if fresh:
                yield [Pulled(self._record(received), received.ack_id,
                              received.message.message_id) for received in fresh]

    def _record(self, received: Any) -> dict[str, Any]:
        where = f"message {received.message.message_id} of {self.subscription}"
        try:
            record = json.loads(received.message.data)
        except ValueError:
            record = None
        return check_record(record, where)

    def skip(self, message_id: str, ack_id: str) -> None:
        self._skipped[message_id] = ack_id
        self._lease([ack_id])

    def forwarded(self, ack_ids: list[str]) -> None:
        for start in range(0, len(ack_ids), 1000):
            self.client.acknowledge(subscription=self.subscription,
                                    ack_ids=ack_ids[start:start + 1000])

    def close(self, pending: list[str]) -> None:
        """Hand back what was skipped or not forwarded: available again at once."""
        self._lease([*self._skipped.values(), *pending], seconds=0)

    def _lease(self, ack_ids: list[str], seconds: int = LEASE_SECONDS) -> None:
        for start in range(0, len(ack_ids), 1000):
            self.client.modify_ack_deadline(subscription=self.subscription,
                                            ack_ids=ack_ids[start:start + 1000],
                                            ack_deadline_seconds=seconds)


# The names publish() binds before its **attrs (the client's signature).
_PUBLISH_PARAMETERS = frozenset({"self", "topic", "data", "ordering_key", "retry", "timeout"})


class Target:
    """Where replays go: the streaming job's input topic, or a JSON Lines file."""

    def __init__(self, topic: str | None, output: str | None) -> None:
        self.topic = topic
        self._handle: BinaryIO | None = None
        if topic:
            import google.cloud.pubsub_v1 as pubsub_v1

            self.publisher = pubsub_v1.PublisherClient(
                publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
        else:
            self._handle = sys.stdout.buffer if output == "-" else open(str(output), "wb")
        self._futures: list[Any] = []

    def write(self, replay: Replay) -> None:
        if self._handle is not None:
            self._handle.write(replay.payload.replace(b"\n", b" ") + b"\n")
            return
        if _PUBLISH_PARAMETERS.isdisjoint(replay.attributes):
            self._futures.append(self.publisher.publish(
                self.topic, replay.payload, ordering_key=replay.ordering_key or "",
                **replay.attributes))
            return
        # An attribute named like a parameter of publish() (`timeout`, `retry`, `data`, …)
        # cannot go through its **attrs: it would be taken as that parameter (and lost) or
        # refused. Such a message is published by the API call itself, after every message
        # before it, so that the order of an ordering key holds.
        from google.pubsub_v1.services.publisher.client import PublisherClient as Api
        from google.pubsub_v1.types import PubsubMessage

        self.flush()
        Api.publish(self.publisher, topic=self.topic, messages=[PubsubMessage(  # its base class
            data=replay.payload, attributes=replay.attributes,
            ordering_key=replay.ordering_key or "")])

    def flush(self) -> None:
        """Everything written so far is stored (published, or on disk)."""
        if self._handle is not None:
            self._handle.flush()
        for future in self._futures:
            future.result()
        self._futures = []

    def close(self) -> None:
        self.flush()
        if self._handle is not None and self._handle is not sys.stdout.buffer:
            self._handle.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walkeros-klaviyo replay",
        description="Send dead letters back through the pipeline (see README: Replay).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dead_letters", help="dead-letter files (a glob; local or gs://)")
    source.add_argument("--dead_letter_subscription",
                        help="projects/P/subscriptions/S on the dead-letter topic; pulled "
                             "until drained, each dead letter acknowledged once replayed")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="JSON Lines file for `run --input` (- for stdout)")
    target.add_argument("--topic", help="projects/P/topics/T: the streaming job's input topic")
    parser.add_argument("--stage", action="append", dest="stages", choices=STAGES,
                        help="replay only these stages (repeatable; default: all)")
    parser.add_argument("--input_id_attribute", metavar="NAME",
                        help="the job's --input_id_attribute: each replay gets a fresh value of "
                             "it, which Dataflow's de-duplication does not drop")
    return parser


def _replay(args: argparse.Namespace) -> tuple[int, int]:
    """(messages replayed, dead letters read of the stages asked for)."""
    wanted = set(args.stages or STAGES)
    seen: set[tuple[Any, ...]] = set()
    replayed = matching = 0
    if args.input_id_attribute and not args.topic:
        raise ReplayError("--input_id_attribute is for replays to a --topic")
    message = partial(replay_of, id_attribute=args.input_id_attribute, run=uuid.uuid4().hex[:12])
    target = Target(args.topic, args.output)
    if args.dead_letters:
        records = [record for record in read_files(args.dead_letters)
                   if record["stage"] in wanted]  # all checked before anything is written
        for record in unique_messages(records, seen):
            target.write(message(record))
            replayed += 1
        target.close()
        return replayed, len(records)
    source = SubscriptionSource(args.dead_letter_subscription)
    pending: list[str] = []
    try:
        for batch in source.batches():
            pending = [pulled.ack_id for pulled in batch if pulled.record["stage"] in wanted]
            for pulled in batch:
                if pulled.record["stage"] not in wanted:
                    source.skip(pulled.message_id, pulled.ack_id)
                    continue
                matching += 1
                for unique in unique_messages([pulled.record], seen):
                    target.write(message(unique))
                    replayed += 1
            target.flush()
            source.forwarded(pending)  # acknowledged only once their replays are stored
            pending = []
        target.close()
    finally:
        source.close(pending)
    return replayed, matching


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        replayed, matching = _replay(args)
    except ReplayError as error:
        print(f"walkeros-klaviyo replay: {error}", file=sys.stderr)
        return 2
    print(f"replayed {replayed} message(s) from {matching} dead letter(s)", file=sys.stderr)
    return 0
