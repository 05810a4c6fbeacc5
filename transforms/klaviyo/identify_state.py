"""Per-profile identify state: plan a profile upsert only when the profile really changed.

port.md D1, as refined here. The walkerOS reference keeps one `lastIdentity` slot per destination
instance, so interleaved users re-upsert on every event and a restart forgets everything. Here the
state is per profile key (Beam keyed state in the pipeline, a dict in `simulate`): a digest of the
last body planned and the newest ordering time seen.

**Ordering time** (refines D1): an event orders its key's upserts by
`min(event timestamp, reference + max skew)`, where the reference is the Pub/Sub publish time, or
else the processing time. A client clock far ahead (a timestamp in microseconds) thus cannot make
one event "newest" for years and freeze the profile. An event whose timestamp Klaviyo would refuse
(D6: before 2000-01-01 or more than a year after the reference) has no ordering time: it never
moves the key's newest time, so it cannot freeze the profile. Its upsert is still planned when
its body changed (Klaviyo takes upserts at any time; only the event call is dead-lettered, at
`preflight`). At the sink it ranks below every upsert with a trustworthy time (as if from before
2000), so it is sent only when none competes with it. Its own timestamp still makes it OLDER than
the newest event seen (a 1969 event never overwrites).

**The verdicts**: CHANGED (the body differs from the last one planned and is not older: send it),
UNCHANGED (equal to the last one planned, whatever its time: passed on as a *hint*), OLDER (a
different body older than the newest seen: never sent) and OUT_OF_RANGE (planned, as CHANGED,
without moving the newest time). An equal body is a hint even when older: the replay of a
dead-lettered upsert is older than a later event that carried the same body, and it must still
reach the sink to repair the profile.

**Following what Klaviyo holds.** A DAG has no way back from the sink to this state, so the
state cannot know whether its last planned body reached Klaviyo. That is why an UNCHANGED body
is not dropped here: the sink, which does know (it keeps a memory of the profiles whose newest
upsert it dead-lettered), sends a hint for such a profile and drops the others
(transforms/klaviyo/flush.py).
So a later event with the same body, or the replay of the dead letter into the running job,
repairs the profile; a fresh job has no state and plans the replayed body as CHANGED.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from transforms.klaviyo.preflight import EARLIEST_TIME_MS, MAX_AHEAD_MS
from transforms.walkeros.jsvalues import canonical_json

DEFAULT_MAX_SKEW_SECONDS = 300


class Verdict(StrEnum):
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    OLDER = "older"
    OUT_OF_RANGE = "out_of_range"


@dataclass(frozen=True)
class IdentifyState:
    """A digest of the last body planned (16 bytes) and the newest ordering time seen for this
    key, planned or not."""

    digest: bytes | None = None
    newest_ms: float | None = None


def ordering_time(timestamp_ms: float, reference_ms: float, max_skew_ms: float) -> float | None:
    """The time that orders a key's upserts (module docstring); None outside Klaviyo's range."""
    if timestamp_ms < EARLIEST_TIME_MS or timestamp_ms > reference_ms + MAX_AHEAD_MS:
        return None
    return min(timestamp_ms, reference_ms + max_skew_ms)


def sink_order(timestamp_ms: float, reference_ms: float, max_skew_ms: float) -> float:
    """The time the sink orders this event's upsert by: its ordering time, or for an event out
    of range a time before every trustworthy one (module docstring)."""
    order_ms = ordering_time(timestamp_ms, reference_ms, max_skew_ms)
    return min(timestamp_ms, EARLIEST_TIME_MS - 1) if order_ms is None else order_ms


def body_digest(body: dict[str, object]) -> bytes:
    """Equal for equal bodies, whatever their key order and `1` vs `1.0`."""
    return hashlib.blake2b(canonical_json(body).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def decide(state: IdentifyState | None, body: dict[str, object], order_ms: float | None, *,
           timestamp_ms: float) -> tuple[IdentifyState, Verdict]:
    """The verdict on this upsert, and the state after the event (module docstring).

    `order_ms` is the event's `ordering_time`; `timestamp_ms` its own time, which still makes an
    out-of-range event older than the newest one seen (a 1969 event never overwrites).
    """
    state = state or IdentifyState()
    digest = body_digest(body)
    if digest == state.digest:  # the body planned last, at any time (a replayed dead letter)
        newest = state.newest_ms if order_ms is None or (
            state.newest_ms is not None and order_ms < state.newest_ms) else order_ms
        return IdentifyState(digest, newest), Verdict.UNCHANGED
    if order_ms is None and state.newest_ms is not None and timestamp_ms < state.newest_ms:
        return state, Verdict.OLDER
    if order_ms is None:
        return IdentifyState(digest, state.newest_ms), Verdict.OUT_OF_RANGE
    if state.newest_ms is not None and order_ms < state.newest_ms:
        return state, Verdict.OLDER
    return IdentifyState(digest, order_ms), Verdict.CHANGED
