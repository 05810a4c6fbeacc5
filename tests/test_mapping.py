"""Each mapping form and each quirk of walkeros.md §2–§3 and §8, on small inputs."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from transforms.walkeros.jsvalues import UNDEFINED
from transforms.walkeros.mapping import (
    MappingConfig,
    MappingContext,
    delete_by_path,
    find_rule,
    flatten_include,
    get_by_path,
    get_mapping_value,
    granted_consent,
    process_event_mapping,
    set_by_path,
)

P1 = {"id": "ers", "name": "Everyday Ruck Snack", "color": "black", "size": "l", "price": 420}
P2 = {"id": "cc", "name": "Cool Cap", "size": "one size", "price": 42}
SHOP = {"shopping": ["complete", 0]}
ORDER = {
    "name": "order complete", "entity": "order", "action": "complete",
    "data": {"id": "0rd3r1d", "currency": "EUR", "shipping": 5.22, "taxes": 73.76, "total": 555},
    "context": SHOP, "globals": {"pagegroup": "shop"}, "custom": {"completely": "random"},
    "user": {"id": "us3r", "device": "c00k13", "session": "s3ss10n"},
    "nested": [
        {"entity": "product", "data": P1, "context": SHOP, "nested": []},
        {"entity": "product", "data": P2, "context": SHOP, "nested": []},
        {"entity": "gift", "data": {"name": "Surprise"}, "context": SHOP, "nested": []},
    ],
    "consent": {"functional": True}, "id": "a1b2c3d4e5f60102", "trigger": "load",
    "timestamp": 1700000102, "timing": 3.14, "source": {"type": "collector", "schema": "4"},
}


def order() -> dict[str, Any]:
    return copy.deepcopy(ORDER)


def resolve(mapping: Any, value: Any = None) -> Any:
    value = order() if value is None else value
    return get_mapping_value(value, mapping, MappingContext(value))


# --- paths -------------------------------------------------------------------------------------


def test_path_lookup_and_list_index() -> None:
    assert resolve("data.total") == 555
    assert resolve("nested.1.data.id") == "cc"
    assert resolve("nested.length") == 3
    assert resolve("nested.01.data.id") is UNDEFINED  # "01" is not an array index in JS


def test_wildcard_keeps_missing_entries_in_place() -> None:
    assert get_by_path(order(), "nested.*.data.id") == ["ers", "cc", UNDEFINED]
    assert get_by_path(order(), "nested.*.data.id", "x") == ["ers", "cc", "x"]


def test_trailing_wildcard_gives_undefined_entries() -> None:
    assert get_by_path(order(), "nested.*") == [UNDEFINED] * 3


def test_star_on_a_non_list_is_a_literal_key() -> None:
    assert get_by_path({"a": {"*": 1}}, "a.*") == 1


def test_path_ending_on_null_returns_null_and_the_mapping_casts_it_away() -> None:
    event = {"data": {"a": None}}
    assert get_by_path(event, "data.a", "fallback") is None
    assert resolve({"key": "data.a", "value": "fallback"}, event) == "fallback"


def test_empty_path_is_the_identity() -> None:
    assert resolve("") == order()


# --- value forms -------------------------------------------------------------------------------


def test_static_values_including_falsy_ones() -> None:
    assert resolve({"key": "data.missing", "value": "fb"}) == "fb"
    assert resolve({"value": 0}) == 0
    assert resolve({"value": False}) is False
    assert resolve({"value": ""}) == ""


def test_numbers_bools_and_empty_objects_resolve_to_undefined() -> None:
    assert resolve(5) is UNDEFINED
    assert resolve(True) is UNDEFINED
    assert resolve({}) is UNDEFINED


def test_unknown_keys_only_act_as_the_identity() -> None:
    assert resolve({"foo": 1}) == order()


def test_top_level_fallback_is_first_defined() -> None:
    assert resolve(["non.existing", "data.id"]) == "0rd3r1d"
    assert resolve(["data.zero", "data.id"], {"data": {"zero": 0, "id": 1}}) == 0


def test_inner_lists_are_first_truthy_else_last() -> None:
    event = {"data": {"a": 0, "b": 5, "c": ""}}
    assert resolve([["data.a", "data.b"]], event) == 5
    assert resolve([["data.a", "data.c"]], event) == ""
    assert resolve([["data.a", "data.missing"]], event) is UNDEFINED


def test_map_omits_undefined_and_ignores_the_static() -> None:
    assert resolve({"map": {"x": "data.missing"}}) == {}
    assert resolve({"value": "x", "map": {"a": "data.id"}}) == {"a": "0rd3r1d"}


def test_loop_over_nested_with_a_condition() -> None:
    def is_product(value: Any, context: MappingContext) -> bool:
        return bool(value.get("entity") == "product")

    mapping = {"loop": ["nested", {"condition": is_product, "key": "data.name"}]}
    assert resolve(mapping) == ["Everyday Ruck Snack", "Cool Cap"]
    assert resolve({"loop": ["this", {"key": "name"}]}) == ["order complete"]


def test_loop_over_a_non_list_returns_the_whole_input() -> None:
    assert resolve({"loop": ["data.id", "data.id"]}) == order()


def test_set_keeps_undefined_entries() -> None:
    assert resolve({"set": ["data.missing", "data.id"]}) == [UNDEFINED, "0rd3r1d"]
    assert resolve({"set": ["name", "data", {"value": "static"}]}) == [
        "order complete", ORDER["data"], "static"]


def test_worked_example_with_nested_forms() -> None:
    assert resolve({"map": {"set": {"set": [{}]}, "map": {}, "loop": []}}) == {"set": [UNDEFINED]}


def test_an_array_as_a_deep_mapping_item_gives_an_empty_object() -> None:
    # Array.prototype.map is the only mapping key a JS array has.
    assert resolve({"set": [[["data.id"], "data.id"]]}) == [{}]


def test_null_anywhere_makes_the_value_undefined() -> None:
    event = {"data": {"a": None, "b": 1, "list": [1, None]}}
    assert resolve("data", event) is UNDEFINED
    assert resolve({"key": "data.list", "value": "fb"}, event) == "fb"


def test_fn_receives_the_input_and_key_overrides_it() -> None:
    assert resolve({"fn": lambda value, context: value["data"]["total"] * 2}) == 1110
    both = {"fn": lambda value, context: "from fn", "key": "data.id"}
    assert resolve(both) == "0rd3r1d"


def test_fn_exception_gives_undefined_then_the_static() -> None:
    def broken(value: Any, context: MappingContext) -> Any:
        raise RuntimeError("boom")

    assert resolve({"fn": broken}) is UNDEFINED
    assert resolve({"fn": broken, "value": "fb"}) == "fb"


def test_validate_failure_falls_back_to_static_and_condition_failure_does_not() -> None:
    assert resolve({"key": "data.id", "validate": lambda v, c: False, "value": "fb"}) == "fb"
    assert resolve({"key": "data.id", "condition": lambda v, c: False, "value": "fb"}) is UNDEFINED


def test_callbacks_see_the_context() -> None:
    seen: list[MappingContext] = []
    item = {"fn": lambda value, context: seen.append(context) or "ok"}
    assert resolve(item) == "ok"
    assert seen[0].mapping is item and seen[0].event["name"] == "order complete"


# --- consent -----------------------------------------------------------------------------------


def test_granted_consent_merges_and_uses_or_semantics() -> None:
    assert granted_consent({"marketing": True}, {"analytics": True}, {"marketing": True,
                                                                      "functional": False}) == {
        "analytics": True, "marketing": True}
    assert granted_consent({"a": True, "b": True}, {}, {"b": True}) == {"b": True}
    assert granted_consent({"marketing": True}, {}, {"marketing": False}) is None
    assert granted_consent({"marketing": False}, {}, {"marketing": True}) is None
    assert granted_consent(UNDEFINED, {}, {"x": 1}) == {"x": True}


def test_value_consent_denied_returns_the_raw_static() -> None:
    event = order() | {"consent": {"analytics": True}}
    assert resolve({"key": "data.id", "consent": {"marketing": True}}, event) is UNDEFINED
    denied = {"key": "data.id", "consent": {"marketing": True}, "value": "withheld"}
    assert resolve(denied, event) == "withheld"
    event["consent"] = {"marketing": True}
    assert resolve(denied, event) == "0rd3r1d"


# --- rules -------------------------------------------------------------------------------------


def rule_key(name: str, rules: dict[str, Any]) -> str:
    return find_rule({"name": name}, rules)[1]


def test_rule_lookup_precedence() -> None:
    rules = {"product": {"*": {"name": "P"}}, "*": {"click": {"name": "C"}}}
    assert rule_key("product click", rules) == "product *"
    assert rule_key("bar click", rules) == "* click"


def test_existing_entity_shadows_wildcard_actions() -> None:
    rules = {"product": {"view": {}}, "*": {"click": {"name": "C"}}}
    assert rule_key("product click", rules) == ""
    rules["*"]["*"] = {"name": "any"}
    assert rule_key("product click", rules) == "* *"


def test_failing_conditions_fall_straight_to_star_star() -> None:
    rules = {"product": {"view": {"condition": lambda e, c: False}, "*": {"name": "entity"}},
             "*": {"*": {"name": "any"}}}
    assert rule_key("product view", rules) == "* *"


def test_a_list_of_rules_takes_the_first_matching() -> None:
    first = {"condition": lambda e, c: e["data"]["n"] > 1, "name": "big"}
    rules = {"order": {"complete": [first, {"name": "small"}]}}
    rule, _ = find_rule({"name": "order complete", "data": {"n": 0}}, rules)
    assert rule is not None and rule["name"] == "small"


def test_names_without_entity_or_action_find_no_rule() -> None:
    assert rule_key("single", {"*": {"*": {}}}) == ""
    assert rule_key("a  b", {"*": {"*": {}}}) == ""


# --- event mapping -----------------------------------------------------------------------------


def mapped(config: dict[str, Any], event: dict[str, Any] | None = None) -> Any:
    return process_event_mapping(event or order(), MappingConfig(config))


def test_rule_name_renames_before_rule_data() -> None:
    result = mapped({"mapping": {"order": {"complete": {"name": "Placed Order",
                                                        "data": {"map": {"n": "name"}}}}}})
    assert result.event["name"] == "Placed Order" and result.event["entity"] == "order"
    assert result.data == {"n": "Placed Order"}


def test_rule_data_merges_over_config_data_only_when_both_are_objects() -> None:
    config = {"data": {"map": {"a": {"value": 1}, "b": {"value": 2}}},
              "mapping": {"order": {"complete": {"data": {"map": {"b": {"value": 3}}}}}}}
    assert mapped(config).data == {"a": 1, "b": 3}
    config["mapping"]["order"]["complete"]["data"] = "data.missing"
    assert mapped(config).data is UNDEFINED


def test_ignore_and_silent_flags() -> None:
    assert mapped({"mapping": {"order": {"complete": {"ignore": True}}}}).ignore
    result = mapped({"mapping": {"order": {"complete": {"silent": True}}}})
    assert result.silent and not result.ignore


def test_policy_reads_the_pre_layer_event_and_writes_undefined() -> None:
    config = {"policy": {"data.total": {"value": 2}, "data.copy": "data.total",
                         "data.shipping": "data.missing"}}
    event = mapped(config).event
    assert event["data"]["total"] == 2 and event["data"]["copy"] == 555
    assert event["data"]["shipping"] is UNDEFINED


def test_rule_policy_sees_config_policy_output() -> None:
    config = {"policy": {"data.total": {"fn": lambda v, c: v["data"]["total"] * 2}},
              "mapping": {"order": {"complete": {
                  "policy": {"data.total": {"fn": lambda v, c: v["data"]["total"] + 50}},
                  "data": "data.total"}}}}
    assert mapped(config).data == 1160


def test_policy_can_change_the_rule_lookup() -> None:
    config = {"policy": {"name": {"value": "order refund"}},
              "mapping": {"order": {"refund": {"name": "Refunded"}}}}
    assert mapped(config).mapping_key == "order refund"


def test_include_flattens_sections_and_data_wins() -> None:
    config = {"include": ["data", "context", "event"],
              "mapping": {"order": {"complete": {"data": {"map": {"data_id": {"value": "x"}}}}}}}
    data = mapped(config).data
    assert data["data_id"] == "x" and data["data_total"] == 555
    assert data["context_shopping"] == "complete" and data["event_entity"] == "order"


def test_rule_include_replaces_config_include_and_empty_disables() -> None:
    config = {"include": ["globals"], "mapping": {"order": {"complete": {"include": []}}}}
    assert mapped(config).data is UNDEFINED


def test_flatten_recurses_objects_and_keeps_lists() -> None:
    event = {"data": {"a": {"b": {"c": 1}}, "l": [1, 2], "u": UNDEFINED}}
    assert flatten_include(event, ["data"]) == {"data_a_b_c": 1, "data_l": [1, 2]}


def test_remove_runs_last() -> None:
    config = {"include": ["data"], "mapping": {"order": {"complete": {
        "remove": ["data_total", "data_taxes"]}}}}
    data = mapped(config).data
    assert "data_total" not in data and "data_taxes" not in data and "data_id" in data


def test_set_and_delete_by_path() -> None:
    assert set_by_path({"a": 1}, "b.c", 2) == {"a": 1, "b": {"c": 2}}
    assert set_by_path({"a": 1}, "a.c", 2) == {"a": {"c": 2}}
    assert delete_by_path({"l": [1, 2, 3]}, "l.1") == {"l": [1, 3]}
    assert delete_by_path({"a": {"b": 1}}, "a.x.y") == {"a": {"b": 1}}


@pytest.mark.parametrize("config", [{"mapping": {}}, {}])
def test_no_rules_means_no_data(config: dict[str, Any]) -> None:
    result = mapped(config)
    assert result.rule is None and result.data is UNDEFINED and not result.ignore
