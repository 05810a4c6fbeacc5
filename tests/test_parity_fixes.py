"""Disagreements with walkerOS 4.4.0 found by the peer suite and issue 11, each pinned by a
test (the byPath ones are peer cases: tests/peer/core_bypath.json)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.simulate import Simulation
from transforms.walkeros.config import load_config
from transforms.walkeros.jsvalues import UNDEFINED
from transforms.walkeros.mapping import MappingConfig, flatten_include, process_event_mapping

EVENT: dict[str, Any] = {
    "name": "order complete", "id": "a1b2c3d4e5f60001", "timestamp": 1764400000000,
    "user": {"id": "u1", "email": "u1@example.com"}, "data": {"id": "ORD-1", "total": 0},
    "context": {"shopping": ["complete", 0], "empty": []},
    "version": {"source": "3.0", "tagging": 1}, "group": "g1", "count": 2,
}


def test_include_has_no_version_section() -> None:
    """walkerOS 4.0.0 removed `event.version` and the `version` include section."""
    assert flatten_include(EVENT, ["version"]) == {}
    assert not any(key.startswith("version_") for key in flatten_include(EVENT, ["all"]))


def test_include_event_section_has_no_group_or_count() -> None:
    """4.4.0's `event` section: entity, action, id, timestamp, name, trigger, timing only."""
    flattened = flatten_include(EVENT, ["event"])
    assert "event_group" not in flattened and "event_count" not in flattened
    assert flattened["event_name"] == "order complete"


def test_an_empty_context_entry_is_dropped() -> None:
    """`context.x = []`: walkerOS takes element 0 of the entry, undefined, and drops the key."""
    flattened = flatten_include(EVENT, ["context"])
    assert flattened == {"context_shopping": "complete"}


def test_the_include_config_warns_about_a_version_section() -> None:
    loaded = load_config({"include": ["version", "data"]})
    assert any("version" in warning for warning in loaded.warnings)


def test_a_path_through_a_falsy_value_falls_back_to_the_static_value() -> None:
    """`data.total` is 0: `data.total.amount` is undefined, so the static value applies."""
    config = MappingConfig({"data": {"map": {"amount": {"key": "data.total.amount",
                                                        "value": "none"}}}})
    assert process_event_mapping(EVENT, config).data == {"amount": "none"}


def _unique_id(rule_settings: dict[str, Any], settings: dict[str, Any] | None = None) -> Any:
    config = load_config({"settings": settings or {},
                          "mapping": {"order": {"complete": {"settings": rule_settings}}}})
    calls = Simulation(config.config).step(EVENT, now_ms=1764400000000)["calls"]
    return calls[-1][1]["data"]["attributes"].get("unique_id", UNDEFINED)


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, "a1b2c3d4e5f60001"),                      # the destination default 'id'
    ({"uniqueId": "data.id"}, "ORD-1"),            # the destination's own setting
])
def test_a_null_rule_unique_id_falls_back_to_the_destination(settings: dict[str, Any],
                                                             expected: str) -> None:
    """walkerOS: `rule.settings.uniqueId ?? settings.uniqueId`."""
    assert _unique_id({"uniqueId": None}, settings) == expected


def test_a_rule_unique_id_that_resolves_to_nothing_does_not_fall_back() -> None:
    assert _unique_id({"uniqueId": "data.missing"}) is UNDEFINED


def test_a_null_rule_identify_falls_back_to_the_destination() -> None:
    config = load_config({"settings": {"identify": {"map": {"firstName": {"value": "Ada"}}}},
                          "mapping": {"order": {"complete": {"settings": {"identify": None}}}}})
    calls = Simulation(config.config).step(EVENT, now_ms=1764400000000)["calls"]
    assert calls[0][0] == "create_or_update_profile"
    assert calls[0][1]["data"]["attributes"]["first_name"] == "Ada"


def test_a_null_rule_value_sends_no_value() -> None:
    """`value` has no destination-level setting: null resolves to nothing."""
    config = load_config({"settings": {"currency": "EUR"},
                          "mapping": {"order": {"complete": {"settings": {"value": None}}}}})
    step = Simulation(config.config).step(EVENT, now_ms=1764400000000)
    attributes = step["calls"][-1][1]["data"]["attributes"]
    assert "value" not in attributes and "value_currency" not in attributes
    assert step["problems"] == []
