"""JavaScript value semantics that the walkerOS mapping language depends on.

walkerOS is TypeScript: its mapping results distinguish `undefined` (absent) from `null`, test
truthiness the JavaScript way (`{}` and `[]` are truthy, `0` and `""` are not), and format numbers
with `String(number)`. A faithful port needs each of these exactly, so they live here, in one place.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson


class _Undefined:
    """JavaScript `undefined`: a value that is absent, distinct from JSON `null` (Python None)."""

    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "UNDEFINED"  # pickles as the module-level singleton (Beam coders pickle values)


UNDEFINED: Final = _Undefined()


def truthy(value: Any) -> bool:
    """JavaScript truthiness: only undefined, null, false, 0, NaN and "" are falsy."""
    kind = value.__class__
    if kind is str:
        return value != ""
    if kind is dict or kind is list or value is True:
        return True
    if value is UNDEFINED or value is None or value is False:
        return False
    if isinstance(value, int | float):
        return value != 0 and not math.isnan(value)
    return True


def is_number(value: Any) -> bool:
    """walkerOS `isNumber`: a JS number that is not NaN (booleans are not numbers)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value)
    )


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def is_property(value: Any) -> bool:
    """walkerOS `isPropertyType`: bool, str, non-NaN number, undefined, or lists/dicts of those.

    `null` anywhere inside makes the whole value invalid (walkerOS quirk §8.7).
    """
    kind = value.__class__
    if kind is dict:
        items: Any = value.values()
    elif kind is list:
        items = value
    else:
        return _is_scalar_property(value)
    for item in items:  # scalars inline: this runs on every mapped object
        item_kind = item.__class__
        if item_kind is str or item_kind is int or item_kind is bool:
            continue
        if item_kind is float:
            if item != item:  # NaN
                return False
        elif not is_property(item):
            return False
    return True


def _is_scalar_property(value: Any) -> bool:
    if value is UNDEFINED or isinstance(value, bool | str):
        return True
    if isinstance(value, int | float):
        return not (isinstance(value, float) and math.isnan(value))
    if isinstance(value, list):
        return all(is_property(item) for item in value)
    if isinstance(value, dict):
        return all(is_property(item) for item in value.values())
    return False


def cast_to_property(value: Any) -> Any:
    """walkerOS `castToProperty`: the value itself if it is a valid property, else undefined."""
    return value if is_property(value) else UNDEFINED


def js_number_to_string(value: int | float) -> str:
    """JavaScript `String(number)` (ECMAScript Number::toString, radix 10).

    Python's `repr` already yields the shortest round-tripping digits, as JavaScript does; only
    the layout differs (JS switches to exponent form below 1e-6 and from 1e21 on, writes `e+21`).
    Integers beyond 2^53 are first rounded to a double, as `JSON.parse` would have done.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < 2**53:
            return str(value)
        value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    # point: where the decimal point sits relative to the digits (ECMAScript's n).
    point = len(whole) + int(exponent or 0)
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    k = len(digits)
    if k <= point <= 21:
        text = digits + "0" * (point - k)
    elif 0 < point <= 21:
        text = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        text = "0." + "0" * (-point) + digits
    else:
        exp = point - 1
        fraction_digits = "." + digits[1:] if k > 1 else ""
        text = f"{digits[0]}{fraction_digits}e{'+' if exp >= 0 else '-'}{abs(exp)}"
    return ("-" if value < 0 else "") + text


def to_json_value(value: Any) -> Any:
    """A copy that `json.dumps` writes the way `JSON.stringify` would.

    Undefined object members are left out, undefined list entries become null, and so do
    infinite numbers (JSON has no Infinity; JavaScript writes null).
    """
    kind = value.__class__
    if kind is dict:
        return {k: v if v.__class__ in _PLAIN else to_json_value(v)
                for k, v in value.items() if v is not UNDEFINED}
    if kind is list:
        return [v if v.__class__ in _PLAIN else to_json_value(v) for v in value]
    if value is UNDEFINED or (kind is float and math.isinf(value)):
        return None
    return value


_PLAIN = frozenset({str, int, bool})


def canonical_json(value: Any) -> str:
    """Stable JSON text for comparing values: sorted keys, and 1.0 written as 1.

    It is stored (the identify state's last body) and hashed (fallback event ids), so its text
    must never change: orjson writes it when it writes exactly what `json.dumps` would, which
    tests/test_fast_paths.py checks on generated values; anything else takes `json.dumps`."""
    try:
        return orjson.dumps(_plain_canonical(value), option=orjson.OPT_SORT_KEYS).decode()
    except (_NotPlain, TypeError):  # TypeError: integers beyond 64 bits, lone surrogates, …
        return json.dumps(_canonical(to_json_value(value)), sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _NotPlain(Exception):
    """A value whose canonical text orjson would not write as `json.dumps` does."""


def _plain_canonical(value: Any) -> Any:
    """`_canonical(to_json_value(value))` in one pass, for values orjson writes like `json`:
    JSON types only, and no float that `repr` writes with an exponent below 1e-4 (`1e-05`,
    which orjson writes `0.00001`), no NaN (which `json.dumps` refuses here)."""
    kind = value.__class__
    if kind is dict:
        return {k: v if v.__class__ in _PLAIN else _plain_canonical(v)
                for k, v in value.items() if v is not UNDEFINED}
    if kind is list:
        return [v if v.__class__ in _PLAIN else _plain_canonical(v) for v in value]
    if kind is float:
        if value.is_integer():
            return int(value) if abs(value) < 2**63 else value
        if abs(value) >= 1e-4 and value - value == 0:  # finite
            return value
        if math.isinf(value):
            return None
        raise _NotPlain
    if kind in _PLAIN:
        return value
    if value is None or value is UNDEFINED:
        return None
    raise _NotPlain


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value
