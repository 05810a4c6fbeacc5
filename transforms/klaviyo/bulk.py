"""Pack planned calls into Klaviyo bulk requests, and map a rejection back to the calls in it.

Pure: no network, no Beam. Items are `(index, part)` pairs where `index` is the position of the
planned call in the caller's list, so every answer (delivered, rejected, duplicate) can be given
per call.

Klaviyo's rules for bulk events (POST /api/event-bulk-create-jobs):
- at most 1000 events and less than 5 MB per request;
- the body lists entries, one per profile, each with its events (which have no `profile` key);
- a `unique_id` repeated for the same profile and metric fails the whole request, so repeats are
  dropped here (Klaviyo would keep only the first anyway);
- one bad item fails the whole request with a 400 whose `source.pointer` names the entry
  (`/data/attributes/events-bulk-create/data/3/...`); `calls_at` maps it back, `without` builds
  the request to resend.

Bulk profile import (POST /api/profile-bulk-import-jobs) takes up to 10,000 profiles and 5 MB,
and its errors point at `/data/attributes/profiles/data/<i>`.

A request Klaviyo keeps failing on without naming an entry (a 5xx, a dropped connection) may be
caused by one payload: `halves` splits a request so the sender can bisect down to it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

from transforms.klaviyo.wire import dumps

MAX_EVENTS_PER_REQUEST = 1000
MAX_PROFILES_PER_REQUEST = 10_000
MAX_REQUEST_BYTES = 5_000_000

# The SDK's model re-writes what we give it: longer timestamps (`.123000+00:00`), `backfill:
# false` on every event and entry, and the entry wrapper. The size of the parts written as the
# wire writes them (`wire.dumps`: compact UTF-8) plus this much per item stays above what goes on
# the wire (tests/test_klaviyo_wire.py checks it on every conformance request).
_SDK_GROWTH_PER_ITEM = 160
_REQUEST_OVERHEAD = 256

_EVENTS_POINTER = re.compile(
    r"^/data/attributes/events-bulk-create/data/(\d+)(?:/attributes/events/data/(\d+))?"
)
_PROFILES_POINTER = re.compile(r"^/data/attributes/profiles/data/(\d+)")

_PROFILE_IDENTIFIERS = ("email", "phone_number", "external_id")

Json = dict[str, Any]
Item = tuple[int, Json]


class Batch(Protocol):
    """What the sender needs from any bulk request to send it and isolate rejected items."""

    @property
    def indexes(self) -> list[int]: ...

    def body(self) -> Json: ...

    def calls_at(self, pointer: str) -> tuple[int, ...]: ...

    def without(self, indexes: Collection[int]) -> Self | None: ...

    def halves(self) -> tuple[Self, Self] | None:
        """Two requests with half of the calls each; None for a single call."""
        ...


@dataclass(frozen=True)
class EventBatch:
    """One bulk events request: `entries` are (profile, events of that profile) in first-seen order.

    The profile is the create_event `profile` value (`{"data": {...}}`); each event is the
    create_event `attributes` without `profile`.
    """

    entries: tuple[tuple[Json, tuple[Item, ...]], ...]

    @classmethod
    def of(cls, items: Sequence[Item], profile_keys: Mapping[int, bytes] | None = None
           ) -> EventBatch:
        """Group create_event attribute dicts (each with its `profile`) by profile;
        `profile_keys` gives the canonical profile of an index when it is already known."""
        grouped: dict[bytes, tuple[Json, list[Item]]] = {}
        for index, attributes in items:
            profile = attributes["profile"]
            event = {key: value for key, value in attributes.items() if key != "profile"}
            key = profile_keys[index] if profile_keys is not None else _canonical(profile)
            grouped.setdefault(key, (profile, []))[1].append((index, event))
        return cls(tuple((profile, tuple(events)) for profile, events in grouped.values()))

    @property
    def indexes(self) -> list[int]:
        return [index for _, events in self.entries for index, _ in events]

    def body(self) -> Json:
        entries = [
            {
                "type": "event-bulk-create",
                "attributes": {
                    "profile": profile,
                    "events": {
                        "data": [{"type": "event", "attributes": event} for _, event in events]
                    },
                },
            }
            for profile, events in self.entries
        ]
        return {
            "data": {
                "type": "event-bulk-create-job",
                "attributes": {"events-bulk-create": {"data": entries}},
            }
        }

    def calls_at(self, pointer: str) -> tuple[int, ...]:
        """The calls a JSON pointer names: one event if it says which, else its whole entry."""
        match = _EVENTS_POINTER.match(pointer)
        if not match or int(match[1]) >= len(self.entries):
            return ()
        events = self.entries[int(match[1])][1]
        if match[2] is None:
            return tuple(index for index, _ in events)
        position = int(match[2])
        return (events[position][0],) if position < len(events) else ()

    def without(self, indexes: Collection[int]) -> EventBatch | None:
        entries = tuple(
            (profile, kept)
            for profile, events in self.entries
            if (kept := tuple(item for item in events if item[0] not in indexes))
        )
        return EventBatch(entries) if entries else None

    def halves(self) -> tuple[EventBatch, EventBatch] | None:
        items = [
            (index, {**event, "profile": profile})
            for profile, events in self.entries
            for index, event in events
        ]
        if len(items) < 2:
            return None
        middle = len(items) // 2
        return EventBatch.of(items[:middle]), EventBatch.of(items[middle:])


@dataclass(frozen=True)
class ProfileBatch:
    """One bulk profile import request: (index, profile resource object) pairs in order."""

    profiles: tuple[Item, ...]

    @property
    def indexes(self) -> list[int]:
        return [index for index, _ in self.profiles]

    def body(self) -> Json:
        return {
            "data": {
                "type": "profile-bulk-import-job",
                "attributes": {"profiles": {"data": [profile for _, profile in self.profiles]}},
            }
        }

    def calls_at(self, pointer: str) -> tuple[int, ...]:
        match = _PROFILES_POINTER.match(pointer)
        if not match or int(match[1]) >= len(self.profiles):
            return ()
        return (self.profiles[int(match[1])][0],)

    def calls_sent_as(self, original_payload: Mapping[str, Any]) -> tuple[int, ...]:
        """The calls whose profile has the identifiers of an import-error's `original_payload`.

        Import errors are reported after the job ran, without the profile's position in the
        request, so the identifiers are what ties them back (as RudderStack's uploader does).
        """
        wanted = _identifiers(original_payload)
        if not wanted:
            return ()
        return tuple(index for index, profile in self.profiles if _identifiers(profile) == wanted)

    def without(self, indexes: Collection[int]) -> ProfileBatch | None:
        kept = tuple(item for item in self.profiles if item[0] not in indexes)
        return ProfileBatch(kept) if kept else None

    def halves(self) -> tuple[ProfileBatch, ProfileBatch] | None:
        if len(self.profiles) < 2:
            return None
        middle = len(self.profiles) // 2
        return ProfileBatch(self.profiles[:middle]), ProfileBatch(self.profiles[middle:])


@dataclass(frozen=True)
class SingleCall:
    """One request carrying one call (a profile-import upsert): sent as it is, never split."""

    index: int
    request_body: Json

    @property
    def indexes(self) -> list[int]:
        return [self.index]

    def body(self) -> Json:
        return self.request_body

    def calls_at(self, pointer: str) -> tuple[int, ...]:
        return ()  # an error of a single call is that call's: no entry to isolate

    def without(self, indexes: Collection[int]) -> SingleCall | None:
        return None if self.index in indexes else self

    def halves(self) -> None:
        return None


@dataclass(frozen=True)
class EventPlan:
    """The requests to send, and which calls were dropped as repeats of which earlier call."""

    batches: list[EventBatch]
    duplicates: dict[int, int]


def plan_event_batches(
    create_event_bodies: Sequence[Mapping[str, Any]],
    max_events: int = MAX_EVENTS_PER_REQUEST,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> EventPlan:
    """Split create_event bodies into bulk requests, dropping repeated unique_ids.

    A repeat is the same (profile, metric, unique_id) as an earlier call anywhere in the list:
    Klaviyo would keep only the first, and inside one request it would reject them all.
    """
    first_seen: dict[tuple[bytes, str, str], int] = {}
    duplicates: dict[int, int] = {}
    items: list[Item] = []
    profile_keys: dict[int, bytes] = {}
    for index, body in enumerate(create_event_bodies):
        attributes = body["data"]["attributes"]
        profile_keys[index] = profile_key = _canonical(attributes["profile"])
        unique_id = attributes.get("unique_id")
        if unique_id is not None:
            key = (profile_key, attributes["metric"]["data"]["attributes"]["name"], unique_id)
            if key in first_seen:
                duplicates[index] = first_seen[key]
                continue
            first_seen[key] = index
        items.append((index, attributes))
    chunks = _chunks(items, max_events, max_bytes)
    return EventPlan([EventBatch.of(chunk, profile_keys) for chunk in chunks], duplicates)


def plan_profile_batches(
    create_or_update_profile_bodies: Sequence[Mapping[str, Any]],
    max_profiles: int = MAX_PROFILES_PER_REQUEST,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> list[ProfileBatch]:
    """Split create_or_update_profile bodies into bulk profile import requests."""
    items = [(index, body["data"]) for index, body in enumerate(create_or_update_profile_bodies)]
    chunks = _chunks(items, max_profiles, max_bytes)
    return [ProfileBatch(tuple(chunk)) for chunk in chunks]


def _chunks(items: Sequence[Item], max_count: int, max_bytes: int) -> list[list[Item]]:
    """Consecutive runs of at most `max_count` items whose estimated wire size is < `max_bytes`.

    A run of `max_count` is measured as a whole first (one `dumps` instead of one per item:
    nearly every run is far below the limit); only a run too large is split item by item.
    """
    chunks: list[list[Item]] = []
    for start in range(0, len(items), max_count):
        run = list(items[start : start + max_count])
        if estimated_bytes([part for _, part in run]) < max_bytes:
            chunks.append(run)
        else:
            chunks += _chunks_by_size(run, max_bytes)
    return chunks


def _chunks_by_size(items: Sequence[Item], max_bytes: int) -> list[list[Item]]:
    """Consecutive runs whose estimated wire size is < `max_bytes`. An item too large on its own
    still gets a request of its own: Klaviyo's rejection of it is then dead-lettered."""
    chunks: list[list[Item]] = []
    current: list[Item] = []
    current_bytes = _REQUEST_OVERHEAD
    for item in items:
        item_bytes = len(dumps(item[1])) + _SDK_GROWTH_PER_ITEM
        if current and current_bytes + item_bytes >= max_bytes:
            chunks.append(current)
            current, current_bytes = [], _REQUEST_OVERHEAD
        current.append(item)
        current_bytes += item_bytes
    if current:
        chunks.append(current)
    return chunks


def _identifiers(profile: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying fields of a profile resource object or of its bare attributes."""
    attributes = profile.get("attributes", profile)
    found = {key: attributes.get(key) for key in _PROFILE_IDENTIFIERS}
    if profile.get("id") is not None:
        found["id"] = profile["id"]
    return {key: value for key, value in found.items() if value is not None}


def estimated_bytes(parts: Sequence[Json]) -> int:
    """An upper bound of the wire size of one request carrying `parts` (create_event attributes
    with their profile, or profile resource objects), as `_chunks` estimates it. The size of
    the items one by one (`_chunks_by_size`) adds up to at least as much."""
    return _REQUEST_OVERHEAD + len(dumps(parts)) + _SDK_GROWTH_PER_ITEM * len(parts)


def _canonical(value: Any) -> bytes:
    """The same text for the same JSON value whatever its key order (profiles are grouped by
    it): the wire writer with sorted keys. A value always takes the same way through it (orjson,
    or `json.dumps` for what orjson refuses), and both texts parse back to their value, so two
    values share a text only if they are equal."""
    return dumps(value, sort_keys=True)
