"""Disagreements with walkerOS 4.4.0 found by the peer suite and issue 11, each pinned by a
test (the byPath ones are peer cases: tests/peer/core_bypath.json)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from pipeline.simulate import Simulation
from transforms.walkeros.config import ConfigError, load_config
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


# --------------------------------------------------------------------------------------------
# `null` in config positions, read against walkerOS 4.4.0's source:
#   core/src/mapping.ts       getMappingEvent, processEventMapping, processMappingValue
#   core/src/consent.ts       getGrantedConsent
#   klaviyo/src/config.ts     getConfig;   klaviyo/src/push.ts   push
# Where walkerOS tests a position with `??`, `?.` or truthiness, `null` is the same as absent.
# Where it hands the `null` to code that throws on it inside a mapping value, the loader refuses
# the config instead (a deliberate, louder difference: walkerOS would drop that value silently).

BASE: dict[str, Any] = {
    "include": ["globals"],
    "settings": {"identify": {"map": {"firstName": {"value": "Ada"}}}},
    "mapping": {"order": {"complete": {
        "name": "Placed Order", "data": {"map": {"OrderId": "data.id"}},
        "settings": {"uniqueId": "data.id", "value": "data.total",
                     "identify": {"map": {"lastName": {"value": "L"}}}},
        "policy": {"data.id": {"value": "ORD-P"}}, "include": ["data"], "remove": ["OrderId"]}}},
}
EVENT_G = {**EVENT, "globals": {"env": "prod"}}


def _step(config: dict[str, Any]) -> dict[str, Any]:
    return Simulation(load_config(config).config).step(EVENT_G, now_ms=1764400000000)


def _without(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    result = copy.deepcopy(config)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    parent.pop(path[-1], None)
    return result


def _with_null(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    result = copy.deepcopy(config)
    parent = result
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    parent[path[-1]] = None
    return result


RULE = ("mapping", "order", "complete")


@pytest.mark.parametrize("path", [
    ("settings",),   # klaviyo config.ts: `partialConfig.settings || {}`
    ("mapping",),    # getMappingEvent: `if (!mapping || …) return {}`
    ("data",),       # `config.data && getMappingValue(…)`; include then uses `data ?? includeData`
    ("policy",),     # `if (config.policy)`
    ("include",),    # `eventMapping?.include ?? config.include`, then `effectiveInclude && …`
    ("mapping", "order"),               # `if (!mapping[entityKey]) entityKey = '*'`
    ("mapping", "order", "complete"),   # `if (!entityMapping[actionKey]) actionKey = '*'`
    (*RULE, "settings"),   # push.ts: `rule?.settings || {}`
    (*RULE, "data"),       # `if (eventMapping.data)`
    (*RULE, "policy"),     # `if (eventMapping?.policy)`
    (*RULE, "include"),    # `eventMapping?.include ?? config.include`: the config's include
    (*RULE, "remove"),     # `if (eventMapping?.remove && isObject(data))`
    (*RULE, "name"),       # `if (eventMapping.name)`; push.ts: not a string → event.name
    (*RULE, "ignore"),     # `if (eventMapping.ignore)`
    (*RULE, "silent"),     # `Boolean(eventMapping?.silent)`; push.ts `rule?.silent !== true`
    (*RULE, "consent"),    # not read for destinations at all
    (*RULE, "condition"),  # getMappingEvent: `if (!rule.condition) return true`
    (*RULE, "settings", "identify"),  # push.ts: `mappingSettings.identify ?? settings.identify`
    (*RULE, "settings", "uniqueId"),  # push.ts: `mappingSettings.uniqueId ?? settings.uniqueId`
    # push.ts resolves a null `identify` / rule `value` (`!== undefined`), but getMappingValue's
    # tryCatch turns processMappingValue's throw on null into undefined (walkeros.md §2.5): the
    # push goes on with no identify and no value, exactly as when they are absent.
    ("settings", "identify"),
    (*RULE, "settings", "value"),
    ("settings", "email"),        # config.ts: `settings.email ?? 'user.email'`
    ("settings", "externalId"),   # config.ts: `settings.externalId ?? 'user.id'`
    ("settings", "uniqueId"),     # config.ts: `settings.uniqueId ?? 'id'`
    ("settings", "phoneNumber"),  # push.ts: `settings.phoneNumber ? … : undefined`
    ("settings", "currency"),     # push.ts: `if (settings.currency)`
    ("settings", "apiKey"),       # config.ts: `if (!apiKey) logger.throw(…)`, as when absent
])
def test_null_is_absent_where_walkeros_reads_it_so(path: tuple[str, ...]) -> None:
    config = {**BASE, "settings": {**BASE["settings"], "currency": "EUR",
                                   "phoneNumber": "user.phone"}}
    assert _step(_with_null(config, path)) == _step(_without(config, path))
    assert load_config(_with_null(config, path)).warnings == []


@pytest.mark.parametrize("key", ["key", "fn", "condition", "validate", "consent", "loop", "map",
                                 "set"])
def test_a_null_value_config_key_is_absent(key: str) -> None:
    """processMappingValue destructures these and tests each for truthiness (`if (key)`, …)."""
    mapping = {"key": "data.id", "value": "static"}
    with_null = {**mapping, key: None}
    expected = {"value": "static"} if key == "key" else mapping
    config = {"data": {"map": {"a": with_null}}}
    assert _step(config) == _step({"data": {"map": {"a": expected}}})


def test_a_null_entity_or_action_falls_to_the_wildcard_rule() -> None:
    fallback = {"*": {"*": {"name": "Fallback"}}}
    for rules in ({"order": None, **fallback}, {"order": {"complete": None}, **fallback}):
        calls = _step({"mapping": rules})["calls"]
        assert calls[-1][1]["data"]["attributes"]["metric"]["data"]["attributes"]["name"] == \
            "Fallback"


def test_null_include_sections_are_ignored() -> None:
    """flattenIncludeSections: `SECTIONS[section]` is undefined for a non-name; it is skipped."""
    loaded = load_config({"include": [None, "globals"]})
    assert any("include" in warning for warning in loaded.warnings)
    attributes = _step({"include": [None, "globals"]})["calls"][-1][1]["data"]["attributes"]
    assert attributes["properties"] == {"globals_env": "prod"}


def test_a_null_destination_consent_denies_every_event() -> None:
    """getGrantedConsent: `hasRequiredConsent = required === undefined`, and nothing in a null
    `required` is true, so the collector queues every event (this port: skipped, counted)."""
    from transforms.walkeros.mapping import granted_consent

    assert granted_consent(None, {"marketing": True}, {"marketing": True}) is None
    assert granted_consent(UNDEFINED, {}, {"marketing": True}) == {"marketing": True}
    loaded = load_config({"consent": None})
    assert any(warning.startswith("consent: null") for warning in loaded.warnings)
    step = _step({"consent": None})
    assert step["skipped"] == "consent" and step["calls"] == []


@pytest.mark.parametrize(("config", "where"), [
    # getMappingEvent: `list.find((rule) => { if (!rule.condition) …` reads a property of null:
    # the push fails for every matching event.
    ({"mapping": {"order": {"complete": [None, {"name": "x"}]}}}, "mapping.order.complete[0]"),
    # processEventMapping: `deleteByPath(data, path)` splits a null path: the push fails.
    ({"mapping": {"order": {"complete": {"remove": [None]}}}}, "mapping.order.complete.remove[0]"),
    # A null mapping item inside a value: processMappingValue's `Object.keys(null)` throws.
    ({"policy": {"data.id": None}}, "policy.data.id"),
    ({"data": [None, "data.id"]}, "data[0]"),
    ({"data": {"set": [None]}}, "data.set[0]"),
    ({"data": {"loop": ["nested", None]}}, "data.loop[1]"),
])
def test_null_where_walkeros_throws_is_a_config_error(config: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where) + ": null"):
        load_config(config)


def test_a_null_step_config_is_an_empty_config() -> None:
    """collector destination.ts registerDestination: `{...code.config, ...config}` spreads a null
    config to nothing (and addDestination: `dataConfig || {init: false}`)."""
    flow = {"version": 4, "flows": {"default": {"destinations": {"klaviyo": {
        "package": "@walkeros/server-destination-klaviyo", "config": None}}}}}
    loaded = load_config(flow)
    assert loaded.config == load_config({}).config and loaded.warnings == []


def test_a_null_consent_state_is_not_required() -> None:
    """getGrantedConsent reads `required[name]` for truthiness: null is false."""
    with_null = {"consent": {"marketing": True, "analytics": None}}
    assert load_config(with_null).config["consent"] == with_null["consent"]
    event = {**EVENT, "consent": {"marketing": True}}
    steps = [Simulation(load_config(config).config).step(event, now_ms=1764400000000)
             for config in (with_null, {"consent": {"marketing": True, "analytics": False}})]
    assert steps[0] == steps[1] and steps[0]["skipped"] is None


def test_a_null_destination_chosen_by_id_is_a_config_error() -> None:
    """The collector's registerDestination destructures the step (`const {code, config} = def`),
    which throws on null."""
    flow = {"version": 4, "flows": {"default": {"destinations": {"klaviyo": None}}}}
    with pytest.raises(ConfigError, match=r"flows\.default\.destinations\.klaviyo: null"):
        load_config(flow, destination="klaviyo")
