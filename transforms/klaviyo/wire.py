"""Klaviyo wire-format helpers: times as the walkerOS reference writes them, method names, and
the JSON writer of request bodies."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import orjson

CREATE_EVENT = "create_event"
CREATE_OR_UPDATE_PROFILE = "create_or_update_profile"

_MS_PER_DAY = 86_400_000


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian (year, month, day) for days since 1970-01-01 (H. Hinnant's algorithm),
    valid far beyond Python's datetime range, as JavaScript Dates are."""
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36_524
                   - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_index = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_index + 2) // 5 + 1
    month = month_index + 3 if month_index < 10 else month_index - 9
    year = year_of_era + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def iso_time(timestamp_ms: float) -> str:
    """JavaScript `new Date(ms).toISOString()`: UTC with milliseconds and `Z`.

    The fraction of a millisecond is cut toward zero, as JavaScript's TimeClip does
    (`-1.5` → `1969-12-31T23:59:59.999Z`); years outside 0–9999 use the ±YYYYYY form.
    """
    if not math.isfinite(timestamp_ms):
        raise ValueError(f"timestamp {timestamp_ms!r} is not a finite number")
    ms = int(timestamp_ms)  # int() truncates toward zero
    days, ms_of_day = divmod(ms, _MS_PER_DAY)
    date = _DATES.get(days) or _date_text(days)
    hours, rest = divmod(ms_of_day, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{date}T{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}Z"


# Days since the epoch → their date text: events come in runs of the same few days, and the
# calendar arithmetic is most of a time's cost. Bounded; cleared when full.
_DATES: dict[int, str] = {}
_MAX_DATES = 4096


def _date_text(days: int) -> str:
    year, month, day = _civil_from_days(days)
    if 0 <= year <= 9999:
        year_text = f"{year:04d}"
    else:
        year_text = f"{'-' if year < 0 else '+'}{abs(year):06d}"
    text = f"{year_text}-{month:02d}-{day:02d}"
    if len(_DATES) >= _MAX_DATES:
        _DATES.clear()
    _DATES[days] = text
    return text


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON as UTF-8 bytes, dates and datetimes as their `isoformat()` (as the SDK's
    sanitizer writes them; orjson's own datetime format is not used); `sort_keys` for a text
    that is the same whatever the key order (bulk.py groups profiles by it).

    orjson, unless the value holds what it refuses (a lone surrogate, an integer beyond 64 bits,
    a key that is not a string): those are written by `json.dumps` as the SDK writes them (ASCII
    escapes, keys as strings), without the spaces. Used for the planner's size estimate too
    (bulk.py), so that it measures what goes on the wire (client.py)."""
    option = orjson.OPT_PASSTHROUGH_DATETIME | (orjson.OPT_SORT_KEYS if sort_keys else 0)
    try:
        return orjson.dumps(value, default=_isoformat, option=option)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, default=_isoformat, separators=(",", ":"),
                          sort_keys=sort_keys).encode()


def _isoformat(value: Any) -> str:
    if isinstance(value, datetime.date):  # datetime too
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")
