"""What one flush of a sink key sends, in which order, and what it remembers: pure decisions.

A sink key (`shard/N`, transforms/sink.py) holds every call of its profiles: each planned event
with its upsert (if any) and its event call (if any). The rules, as port.md D1 and §1 ask:

- **Newest wins.** Per profile only the newest waiting upsert by ordering time is sent; the
  others are settled as superseded. An upsert older than one Klaviyo already accepted for that
  profile (the key's `ProfileMemory`) is never sent. A profile whose import job is still running
  sends nothing new until the job settles, so two bodies of one profile are never in flight.
- **Hints** (unchanged upserts, transforms/klaviyo/identify_state.py) are sent only for a profile
  whose newest upsert this key dead-lettered: that is how a later equal body, or a replay of the
  dead letter, repairs it. Otherwise they are settled as unchanged.
- **Upserts before events.** An event call waits while its profile has an upsert that is not yet
  accepted or dead-lettered (its own, or the newer one that superseded it).
- **One meaning of `null`.** Klaviyo's bulk import ignores `null` (profile-import clears the
  field), so only bodies with no `null` anywhere may go as a bulk import, and only when more of
  them than the threshold wait; the others always go one by one through profile-import. A bulk
  import then carries each profile once (one upsert per profile is sent).

The memory is compact and bounded: per profile the newest accepted ordering time and the ordering
time of a dead-lettered newest upsert, each forgotten after its own horizon.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Why an upsert is settled without being sent; the sink counts each as `profiles_<why>`.
SUPERSEDED = "superseded"  # a newer upsert of the same profile is sent instead
UNCHANGED = "hint_unneeded"  # a hint for a profile Klaviyo holds: nothing to repair
OLDER = "older_than_delivered"  # older than an upsert Klaviyo already accepted

_NONE = float("nan")  # "no time" inside the packed memory
_ENTRY = struct.Struct(">ddd")


@dataclass(frozen=True)
class Upsert:
    """A waiting upsert: its profile, ordering time and whether it is a hint."""

    key: str
    order_ms: float
    changed: bool


@dataclass(frozen=True)
class UpsertPlan:
    """Indexes of the upserts given to `plan_upserts`: send now, settle unsent (why), wait."""

    send: list[int]
    settle: dict[int, str]
    wait: list[int]


@dataclass(frozen=True)
class _Entry:
    accepted_ms: float | None
    failed_ms: float | None
    seen_s: float


class ProfileMemory:
    """What one sink key knows of the profiles it sent (module docstring)."""

    def __init__(self, entries: Mapping[str, _Entry] | None = None) -> None:
        self._entries: dict[str, _Entry] = dict(entries or {})

    def __len__(self) -> int:
        return len(self._entries)

    def accepted_ms(self, key: str) -> float | None:
        entry = self._entries.get(_stored(key))
        return None if entry is None else entry.accepted_ms

    def failed(self, key: str) -> bool:
        entry = self._entries.get(_stored(key))
        return entry is not None and entry.failed_ms is not None

    def accepted(self, key: str, order_ms: float, now_s: float) -> None:
        """Klaviyo took this upsert: it holds a body at least this new, repaired or not."""
        key = _stored(key)
        entry = self._entries.get(key, _Entry(None, None, now_s))
        newest = order_ms if entry.accepted_ms is None else max(entry.accepted_ms, order_ms)
        failed = entry.failed_ms if entry.failed_ms is not None and \
            entry.failed_ms > newest else None
        self._entries[key] = _Entry(newest, failed, now_s)

    def dead_lettered(self, key: str, order_ms: float, now_s: float) -> None:
        """This upsert will not reach Klaviyo: hints for the profile are sent from now on,
        unless Klaviyo already holds a newer body."""
        key = _stored(key)
        entry = self._entries.get(key, _Entry(None, None, now_s))
        if entry.accepted_ms is not None and entry.accepted_ms >= order_ms:
            return
        failed = order_ms if entry.failed_ms is None else max(entry.failed_ms, order_ms)
        self._entries[key] = _Entry(entry.accepted_ms, failed, now_s)

    def prune(self, now_s: float, *, accepted_horizon_s: float, failed_horizon_s: float) -> None:
        """Forget accepted times after `accepted_horizon_s` (only a shuffle's reordering needs
        them) and dead-lettered ones after `failed_horizon_s` (as long as the identify state
        could call their body unchanged)."""
        kept = {}
        for key, entry in self._entries.items():
            age = now_s - entry.seen_s
            failed = entry.failed_ms if age <= failed_horizon_s else None
            accepted = entry.accepted_ms if age <= accepted_horizon_s else None
            if failed is not None or accepted is not None:
                kept[key] = _Entry(accepted, failed, entry.seen_s)
        self._entries = kept

    def encode(self) -> bytes:
        """Packed: per entry three doubles, then the key's UTF-8 bytes with a 2-byte length."""
        parts = []
        for key, entry in self._entries.items():
            raw = key.encode("utf-8", "surrogatepass")
            parts.append(_ENTRY.pack(_or_nan(entry.accepted_ms), _or_nan(entry.failed_ms),
                                     entry.seen_s) + len(raw).to_bytes(2, "big") + raw)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes | None) -> ProfileMemory:
        entries = {}
        offset = 0
        while data and offset < len(data):
            accepted, failed, seen = _ENTRY.unpack_from(data, offset)
            offset += _ENTRY.size
            size = int.from_bytes(data[offset:offset + 2], "big")
            key = data[offset + 2:offset + 2 + size].decode("utf-8", "surrogatepass")
            offset += 2 + size
            entries[key] = _Entry(_or_none(accepted), _or_none(failed), seen)
        return cls(entries)


_LONGEST_KEY_CHARS = 0xFFFF // 4  # the 2-byte length holds their UTF-8 bytes, whatever they are


def _stored(key: str) -> str:
    """The key the memory holds a profile under: itself, or for a key whose UTF-8 bytes the
    2-byte length of `encode` cannot hold (pre-flight lets 100 KiB strings through), a digest
    that no real key is (it starts with a NUL)."""
    if len(key) <= _LONGEST_KEY_CHARS:
        return key
    raw = key.encode("utf-8", "surrogatepass")
    return key if len(raw) <= 0xFFFF else "\0sha256:" + hashlib.sha256(raw).hexdigest()


def _or_nan(value: float | None) -> float:
    return _NONE if value is None else value


def _or_none(value: float) -> float | None:
    return None if value != value else value  # NaN is the only value unequal to itself


def plan_upserts(upserts: Sequence[Upsert], memory: ProfileMemory, busy: Collection[str]
                 ) -> UpsertPlan:
    """One flush's upsert decisions (module docstring). `busy`: profiles with an import job in
    flight, whose upserts wait."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for index, upsert in enumerate(upserts):
        by_key[upsert.key].append(index)
    send: list[int] = []
    settle: dict[int, str] = {}
    wait: list[int] = []
    for key, indexes in by_key.items():
        if key in busy:
            wait += indexes
            continue
        changed = [index for index in indexes if upserts[index].changed]
        candidates = changed or (indexes if memory.failed(key) else [])
        chosen = max(candidates, key=lambda index: upserts[index].order_ms, default=None)
        accepted_ms = memory.accepted_ms(key)
        for index in indexes:
            if index != chosen:
                settle[index] = SUPERSEDED if chosen is not None else UNCHANGED
        if chosen is None:
            continue
        if accepted_ms is not None and upserts[chosen].order_ms < accepted_ms:
            settle[chosen] = OLDER
        else:
            send.append(chosen)
    return UpsertPlan(send, settle, wait)


def has_null(value: Any) -> bool:
    """Whether a JSON value holds `null` anywhere."""
    if value is None:
        return True
    if isinstance(value, dict):
        return any(has_null(item) for item in value.values())
    if isinstance(value, list):
        return any(has_null(item) for item in value)
    return False


def split_for_import(bodies: Sequence[Mapping[str, Any]], threshold: int
                     ) -> tuple[list[int], list[int]]:
    """(indexes for a bulk import, indexes for profile-import): bodies without `null` go in
    bulk when more than `threshold` of them wait (module docstring)."""
    no_null = [index for index, body in enumerate(bodies) if not has_null(body)]
    if len(no_null) <= threshold:
        return [], list(range(len(bodies)))
    bulk = set(no_null)
    return no_null, [index for index in range(len(bodies)) if index not in bulk]


def ready_events(keys: Sequence[str | None], unsettled: Collection[str]) -> list[int]:
    """Indexes of the event calls that may go now: their profile has no upsert unsettled."""
    return [index for index, key in enumerate(keys) if key is None or key not in unsettled]


def past_retry_deadline(first_attempt_s: float, now_s: float, max_retry_seconds: float) -> bool:
    """Whether a call first tried at `first_attempt_s` is past its retry deadline."""
    return now_s - first_attempt_s >= max_retry_seconds
