"""What flows between the stages, in order: Envelope → ParsedEvent → PlannedEvent → OutgoingCall.

Every element keeps the `Envelope` it came from, so that a failure at any stage, up to the sink,
can dead-letter the original message (port.md D9) rather than a half-processed copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transforms.klaviyo.plan import Call, EventPlan


@dataclass(frozen=True)
class Envelope:
    """One input record as received: a Pub/Sub message or one line of a file."""

    payload: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None  # the fallback event id (port.md D4)
    publish_time_ms: float | None = None  # the fallback event time (port.md D5)
    ordering_key: str | None = None  # kept for the dead letters, so a replay can set it again


@dataclass(frozen=True)
class ParsedEvent:
    """A valid walkerOS event (parse stage)."""

    envelope: Envelope
    event: dict[str, Any]


@dataclass(frozen=True)
class PlannedEvent:
    """The Klaviyo calls an event asks for, before the identify-state decision (plan stage)."""

    envelope: Envelope
    plan: EventPlan


@dataclass(frozen=True)
class OutgoingCall:
    """One call to make, after the identify-state decision (identify_state stage)."""

    envelope: Envelope
    event_id: Any
    profile_key: str | None
    call: Call
