"""Pre-flight checks against Klaviyo's limits (klaviyo.md §3.5, port.md D6).

One invalid item fails a whole Klaviyo bulk request, so what Klaviyo would reject is caught
here and sent to the dead letters with the reason, before it can fail a batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson

from transforms.klaviyo.wire import iso_time

EARLIEST_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_AHEAD_MS = 365 * 86_400_000  # "at most one year in the future"
MAX_METRIC_NAME = 127  # "< 128 characters"
MAX_PROPERTIES = 400
MAX_STRING_BYTES = 100 * 1024
MAX_EVENT_BYTES = 5 * 1024 * 1024
MAX_PROFILE_BYTES = 100 * 1024

# The fields of the SDK's ProfileUpsertQuery attributes and of its ProfileLocation that are
# `Optional[StrictStr]` (tests/test_fast_paths.py checks these against the models themselves).
PROFILE_TEXT_FIELDS = frozenset({"email", "phone_number", "external_id", "_kx", "kx",
                                 "first_name", "last_name", "organization", "locale", "title",
                                 "image"})
LOCATION_TEXT_FIELDS = frozenset({"address1", "address2", "city", "country", "region", "zip",
                                  "timezone", "ip"})


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _json_size(body: dict[str, Any]) -> int:
    """Bytes of the body as compact UTF-8 JSON."""
    try:
        return len(orjson.dumps(body))  # fast; refuses lone surrogates and huge integers
    except TypeError:
        return _utf8_size(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


def _common_problems(body: dict[str, Any], max_bytes: int) -> list[str]:
    """Body size and string length limits; no string can be longer than a body that is
    small enough, so the walk over every string is needed only for large bodies."""
    size = _json_size(body)
    if size <= min(max_bytes, MAX_STRING_BYTES):
        return []
    problems = []
    if size > max_bytes:
        problems.append(f"body is {size} bytes, over Klaviyo's limit of {max_bytes}")
    longest = max((_utf8_size(text) for text in _strings(body)), default=0)
    if longest > MAX_STRING_BYTES:
        problems.append(f"a string of {longest} bytes is over Klaviyo's limit of "
                        f"{MAX_STRING_BYTES}")
    return problems


def event_problems(body: dict[str, Any], timestamp_ms: float, now_ms: float) -> list[str]:
    """Why Klaviyo would reject this create_event body; empty when it would accept it."""
    attributes = body["data"]["attributes"]
    problems = []
    if timestamp_ms < EARLIEST_TIME_MS:
        problems.append(f"time {attributes['time']} is before 2000-01-01, which Klaviyo rejects")
    elif timestamp_ms > now_ms + MAX_AHEAD_MS:
        problems.append(f"time {attributes['time']} is more than one year after "
                        f"{iso_time(now_ms)}, which Klaviyo rejects")
    name = attributes["metric"]["data"]["attributes"].get("name")
    if not isinstance(name, str) or len(name) > MAX_METRIC_NAME:
        problems.append(f"metric name must be a string under 128 characters, got {name!r:.60}")
    if len(attributes["properties"]) > MAX_PROPERTIES:
        problems.append(f"{len(attributes['properties'])} properties, over Klaviyo's limit of "
                        f"{MAX_PROPERTIES}")
    return problems + _common_problems(body, MAX_EVENT_BYTES)


def _surely_valid_profile(body: dict[str, Any]) -> bool:
    """True only for bodies the SDK's ProfileUpsertQuery certainly accepts: the shape the planner
    builds, with text (or null) in text fields, an object (or null) as location and properties.
    Anything else, unknown fields included, is left to the model itself."""
    data = body.get("data")
    if data.__class__ is not dict or data.keys() != {"type", "attributes"} or \
            data["type"] != "profile" or data["attributes"].__class__ is not dict:
        return False
    for name, value in data["attributes"].items():
        if value is None or (value.__class__ is str and name in PROFILE_TEXT_FIELDS):
            continue
        if name == "properties" and value.__class__ is dict:
            continue
        if name != "location" or value.__class__ is not dict:
            return False
        for part, text in value.items():
            if text is not None and text.__class__ is not str and part in LOCATION_TEXT_FIELDS:
                return False
    return True


def profile_problems(body: dict[str, Any]) -> list[str]:
    """Why Klaviyo would reject this create_or_update_profile body; empty when it would not.

    Identify bodies come from user mappings (`firstName: 5`, `location: "Berlin"`, a numeric
    `zip`), which the SDK's strict request model refuses before sending. The planner's usual
    bodies are recognised as valid without the model; any other body is checked by that very
    model, imported only then (the SDK takes a tenth of a second to import, a lot for `simulate`).
    """
    problems = _common_problems(body, MAX_PROFILE_BYTES)
    return problems if _surely_valid_profile(body) else problems + model_problems(body)


def model_problems(body: dict[str, Any]) -> list[str]:
    """What the SDK's ProfileUpsertQuery model says of the body, one line per error."""
    from openapi_client.models import ProfileUpsertQuery
    from pydantic import ValidationError

    try:
        ProfileUpsertQuery.model_validate(body)
    except ValidationError as error:
        return [f"{'.'.join(str(part) for part in detail['loc'])}: {detail['msg']} "
                f"(got {detail.get('input')!r:.60})" for detail in error.errors()]
    return []
