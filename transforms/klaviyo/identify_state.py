"""Per-profile identify state: send a profile upsert only when the profile really changed.

port.md D1. The walkerOS reference keeps one `lastIdentity` slot per destination instance, so
interleaved users re-upsert on every event and a restart forgets everything. Here the state is
per profile key (Beam keyed state in the pipeline, a dict in `simulate`) and survives out-of-order
delivery: an event older than the newest one seen never overwrites newer profile data.
"""

from __future__ import annotations

from dataclasses import dataclass

from transforms.walkeros.jsvalues import canonical_json


@dataclass(frozen=True)
class IdentifyState:
    """The last profile body sent (canonical JSON) and the newest event time that resolved an
    identify body for this key, sent or not."""

    last_body: str | None = None
    newest_ms: float | None = None


def decide(
    state: IdentifyState | None, body: dict[str, object], timestamp_ms: float
) -> tuple[IdentifyState, bool]:
    """Whether to send this upsert, and the state after the event.

    Send when the body differs from the last one sent (key order and 1 vs 1.0 do not count) and
    the event is not older than the newest seen; either way the newest time advances.
    """
    state = state or IdentifyState()
    canonical = canonical_json(body)
    not_older = state.newest_ms is None or timestamp_ms >= state.newest_ms
    send = canonical != state.last_body and not_older
    newest = timestamp_ms if state.newest_ms is None else max(state.newest_ms, timestamp_ms)
    return IdentifyState(canonical if send else state.last_body, newest), send
