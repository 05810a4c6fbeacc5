"""The walkerOS event (v4): parsing, validation, and the view a destination's mappings get.

Parsing returns a result, never raises for bad input: an `InvalidEvent` carries a precise,
human-readable reason that the pipeline puts into the dead letters (port.md D9).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from transforms.walkeros.jsvalues import canonical_json, is_number

# JavaScript Dates hold at most ±8.64e15 ms around the epoch; beyond that `new Date(t)` is invalid.
MAX_DATE_MS = 8.64e15

_OBJECT_SECTIONS = ("data", "context", "globals", "custom", "user", "consent", "source")
_DEFAULTED_SECTIONS = ("data", "context", "globals", "custom", "user")


@dataclass(frozen=True)
class InvalidEvent:
    """Input that is not a usable walkerOS event, and why (for the dead letters)."""

    reason: str


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_event(raw: bytes | str | dict[str, Any]) -> dict[str, Any] | InvalidEvent:
    """Decode and validate one event; the dict returned is the event exactly as received."""
    if isinstance(raw, dict):
        event: Any = raw
    else:
        try:
            event = orjson.loads(raw)  # fast; anything it refuses gets the standard parser's word
        except orjson.JSONDecodeError:
            try:
                text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as error:
                return InvalidEvent(f"not UTF-8: invalid byte at position {error.start}")
            try:
                event = json.loads(text, parse_constant=_reject_constant)
            except json.JSONDecodeError as error:
                return InvalidEvent(f"invalid JSON at line {error.lineno} column {error.colno}: "
                                    f"{error.msg}")
            except ValueError as error:
                return InvalidEvent(str(error))
            except RecursionError:
                return InvalidEvent("invalid JSON: nested too deeply")
    problem = validate_event(event)
    return InvalidEvent(problem) if problem else event


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def validate_event(event: Any) -> str | None:
    """The reason `event` cannot be processed, or None when it can."""
    if not isinstance(event, dict):
        return f"event must be a JSON object, got {_type_name(event)}"
    name = event.get("name")
    if not isinstance(name, str) or not name:
        got = "missing" if "name" not in event else _type_name(name)
        return f"name must be a non-empty string 'entity action', got {got}"
    parts = name.split(" ")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return f"name {name!r} must be 'entity action' (two words separated by one space)"
    for section in _OBJECT_SECTIONS:
        if section in event and not isinstance(event[section], dict):
            return f"{section} must be an object, got {_type_name(event[section])}"
    if "nested" in event and not isinstance(event["nested"], list):
        return f"nested must be an array, got {_type_name(event['nested'])}"
    if "timestamp" in event:
        timestamp = event["timestamp"]
        if not is_number(timestamp):
            return f"timestamp must be a number of milliseconds, got {_type_name(timestamp)}"
        if not math.isfinite(timestamp) or abs(timestamp) > MAX_DATE_MS:
            return f"timestamp {timestamp!r} is not a representable time in milliseconds"
    return None


def fallback_event_id(event: dict[str, Any], message_id: str | None = None) -> str:
    """A stable id for an event without one (port.md D4): the Pub/Sub message id, else a 16-hex
    digest of the canonical event JSON, so a retried or replayed event keeps its `unique_id`."""
    if message_id:
        return message_id
    return hashlib.sha256(canonical_json(event).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def destination_view(
    event: dict[str, Any],
    granted: dict[str, bool],
    *,
    fallback_timestamp_ms: float,
    message_id: str | None = None,
) -> dict[str, Any]:
    """The event as walkerOS hands it to a destination (port.md §1): missing sections default
    (`{}`, `nested` `[]`), entity/action come from the name when absent, consent is the map of
    granted states, a missing id gets a stable fallback (D4) and a missing or 0 timestamp the
    publish or processing time (D5). The input is not modified."""
    view = dict(event)
    for section in _DEFAULTED_SECTIONS:
        view.setdefault(section, {})
    view.setdefault("nested", [])
    entity, action = event["name"].split(" ")[:2]
    view.setdefault("entity", entity)
    view.setdefault("action", action)
    view["consent"] = granted
    if "id" not in event:
        view["id"] = fallback_event_id(event, message_id)
    if not event.get("timestamp"):
        view["timestamp"] = fallback_timestamp_ms
    return view
