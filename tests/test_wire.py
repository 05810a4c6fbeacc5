"""JavaScript number formatting and ISO times, as the walkerOS reference writes them."""

from __future__ import annotations

import pytest

from transforms.klaviyo.wire import iso_time
from transforms.walkeros.jsvalues import UNDEFINED, canonical_json, js_number_to_string, truthy


@pytest.mark.parametrize(("number", "text"), [
    (90210, "90210"), (1e21, "1e+21"), (1.5e-7, "1.5e-7"), (5e20, "500000000000000000000"),
    (1.5, "1.5"), (4.0, "4"), (-0.0, "0"), (1e-6, "0.000001"), (1e-7, "1e-7"),
    (0.30000000000000004, "0.30000000000000004"), (1.7976931348623157e308,
                                                   "1.7976931348623157e+308"),
    (-2.5e-10, "-2.5e-10"), (123456789012345680000.0, "123456789012345680000"),
    (2**60, "1152921504606847000"), (float("inf"), "Infinity"),
])
def test_js_number_to_string(number: float, text: str) -> None:
    assert js_number_to_string(number) == text


@pytest.mark.parametrize(("timestamp", "text"), [
    (1700000100, "1970-01-20T16:13:20.100Z"),
    (1722470400123.9, "2024-08-01T00:00:00.123Z"),
    (-1.5, "1969-12-31T23:59:59.999Z"),
    (0, "1970-01-01T00:00:00.000Z"),
    (951782400000, "2000-02-29T00:00:00.000Z"),
    (253402300800000, "+010000-01-01T00:00:00.000Z"),
    (-62198755200000, "-000001-01-01T00:00:00.000Z"),
])
def test_iso_time_matches_javascript(timestamp: float, text: str) -> None:
    assert iso_time(timestamp) == text


def test_truthiness_is_javascripts() -> None:
    assert not any(truthy(v) for v in (UNDEFINED, None, False, 0, 0.0, float("nan"), ""))
    assert all(truthy(v) for v in ({}, [], "0", -1, True, float("inf")))


def test_canonical_json_ignores_key_order_and_integral_floats() -> None:
    assert canonical_json({"b": 1.0, "a": [2, UNDEFINED]}) == canonical_json({"a": [2.0, None],
                                                                              "b": 1})


def test_json_values_follow_json_stringify() -> None:
    from transforms.walkeros.jsvalues import to_json_value

    value = {"a": UNDEFINED, "b": [UNDEFINED, float("inf")], "c": {"d": -float("inf"), "e": 1.5}}
    assert to_json_value(value) == {"b": [None, None], "c": {"d": None, "e": 1.5}}
