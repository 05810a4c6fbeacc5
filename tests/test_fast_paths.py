"""Property tests: each fast path gives exactly what the general implementation gives.

canonical_json is stored (identify state) and hashed (fallback event ids), so its text must stay
the same to the byte; simulate's output must be the same JSON values; the pre-flight shortcut
must never pass a profile body the SDK's model refuses.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from openapi_client.models import ProfileLocation
from openapi_client.models import ProfileUpsertQueryResourceObjectAttributes as Attributes
from pydantic import StrictStr

from pipeline.bench import EXAMPLES, event_mix
from pipeline.simulate import Simulation
from tests.conformance import SETS, load_cases
from tests.test_properties import configs, events, json_values, mapping_values
from transforms.klaviyo import preflight
from transforms.klaviyo.wire import iso_time
from transforms.lines import standard_json_line, to_json_line
from transforms.walkeros import jsvalues
from transforms.walkeros import mapping as mapping_module
from transforms.walkeros.config import ConfigError, load_config, load_config_file
from transforms.walkeros.jsvalues import UNDEFINED, canonical_json, is_property
from transforms.walkeros.mapping import (
    MappingConfig,
    _gives_raw_static,
    compile_value,
    find_rule,
    get_by_path,
)

NOW = 1_764_400_000_000

# Every kind of text (lone surrogates included), number (-0.0, 1.0, tiny and huge floats, NaN,
# infinities, integers beyond 64 bits) and undefined, nested.
texts = st.text(st.characters(codec=None, categories=None), max_size=6) | st.text(
    st.sampled_from(["\ud800", "\udfff", "\x00", "\x1f", "\x7f", "\u2028", "é", "\U0001f600",
                     '"', "\\", "a"]), max_size=4)
numbers = (st.floats() | st.integers() | st.integers(min_value=2**63 - 3, max_value=2**64 + 3)
           | st.integers(max_value=-2**63 + 3, min_value=-2**63 - 3)
           | st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0**63, 1e16, 1e-5, 1e-4, 1.5e-7, 5e-324]))
leaves = st.none() | st.booleans() | numbers | texts | st.just(UNDEFINED)
values = st.recursive(leaves, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(texts, children, max_size=4), max_leaves=16)


def reference_canonical(value: Any) -> str:
    """canonical_json as it was written before the orjson path (its general path)."""
    return json.dumps(jsvalues._canonical(jsvalues.to_json_value(value)), sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def outcome(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except (ValueError, TypeError, RecursionError) as error:
        return type(error)


@settings(max_examples=2000, deadline=None)
@given(value=values)
def test_canonical_json_is_the_same_text(value: Any) -> None:
    assert outcome(canonical_json, value) == outcome(reference_canonical, value)


def test_canonical_json_edge_values() -> None:
    for value in (1.0, -0.0, 2**64, -2**63 - 1, 2.0**63, 1e300, 1e-5, 0.0001, float("inf"),
                  "\ud800", "é\u2028\x00", {"é": 1, "z": 2, "\U0001f600": 3, "a": [1.5, UNDEFINED]},
                  {"x": UNDEFINED}, [UNDEFINED]):
        assert canonical_json(value) == reference_canonical(value)
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


# ------------------------------------------------------------------------------------------
# Pre-flight of profile bodies


def reference_profile_problems(body: dict[str, Any]) -> list[str]:
    """profile_problems with the SDK's model run on every body (the general path)."""
    return (preflight._common_problems(body, preflight.MAX_PROFILE_BYTES)
            + preflight.model_problems(body))


def text_fields(model: Any) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if field.annotation == StrictStr | None:
            names |= {name} | ({field.alias} if field.alias else set())
    return names


def test_the_shortcut_knows_the_models_text_fields() -> None:
    assert text_fields(Attributes) == preflight.PROFILE_TEXT_FIELDS
    assert text_fields(ProfileLocation) == preflight.LOCATION_TEXT_FIELDS
    assert set(ProfileLocation.model_fields) - preflight.LOCATION_TEXT_FIELDS == {"latitude",
                                                                                 "longitude"}


attribute_values = st.none() | st.booleans() | st.integers() | texts | st.lists(texts, max_size=2) \
    | st.dictionaries(texts, texts, max_size=2)
location_names = st.sampled_from(sorted(preflight.LOCATION_TEXT_FIELDS) + ["latitude", "other"])
attribute_names = st.sampled_from(sorted(preflight.PROFILE_TEXT_FIELDS)
                                  + ["location", "properties", "other"])
attributes = st.dictionaries(attribute_names, attribute_values | st.dictionaries(
    location_names, attribute_values, max_size=3), max_size=6)
# Bodies as the planner builds them, most of them valid: the shortcut's side of the border.
text_or_none = st.integers(0, 19).flatmap(
    lambda pick: st.none() if pick == 0 else st.integers() if pick == 1 else texts)
planned_attributes = st.fixed_dictionaries({}, optional={
    **{name: text_or_none for name in sorted(preflight.PROFILE_TEXT_FIELDS)},
    "location": st.none() | st.dictionaries(location_names, text_or_none | st.floats(),
                                            max_size=3) | st.dictionaries(
        location_names, text_or_none, max_size=3),
    "properties": st.none() | st.dictionaries(texts, json_values, max_size=3) | texts})
planned_bodies = st.fixed_dictionaries({"data": st.fixed_dictionaries(
    {"type": st.just("profile"), "attributes": planned_attributes})})
bodies = st.one_of([planned_bodies] * 3 + [st.fixed_dictionaries({"data": st.fixed_dictionaries(
    {"type": st.sampled_from(["profile", "profile", "event"]), "attributes": attributes},
    optional={"id": st.none() | texts | st.integers()})})])


@settings(max_examples=1000, deadline=None)
@given(body=bodies)
def test_profile_problems_are_those_of_the_sdk_model(body: dict[str, Any]) -> None:
    assert preflight.profile_problems(body) == reference_profile_problems(body)


def test_usual_profile_bodies_take_the_shortcut() -> None:
    body = {"data": {"type": "profile", "attributes": {
        "email": "a@example.org", "external_id": "u1", "first_name": "Ann", "location": {
            "city": "Pune", "latitude": 18.5}, "properties": {"plan": ["pro", 5]}}}}
    assert preflight._surely_valid_profile(body)
    assert not preflight._surely_valid_profile({"data": {"type": "profile", "attributes": {
        "email": "a@example.org", "zip": 12345}}})


# ------------------------------------------------------------------------------------------
# simulate's output lines


def assert_same_lines(simulation: Simulation, reference: Simulation, lines: list[Any]) -> None:
    """Same JSON values line by line, or the same exception (a planner bug shows in both)."""
    for line in lines:
        fast = outcome(simulation.step_json, line, NOW)
        slow = outcome(lambda raw: to_json_line(reference.step(raw, now_ms=NOW)), line)
        if isinstance(slow, str):
            assert isinstance(fast, str) and "\n" not in fast
            assert json.loads(fast) == json.loads(slow), line
        else:
            assert fast is slow, line


def test_simulate_lines_of_the_bench_mix_and_conformance_cases() -> None:
    config = load_config_file(str(EXAMPLES / "flow.json")).config
    mix = [raw.decode() for raw in event_mix(2000)]
    assert_same_lines(Simulation(config), Simulation(config), mix)
    for name in SETS:
        for case, _ in load_cases(name):
            config = load_config(case["config"]).config
            lines = [json.dumps(event, ensure_ascii=False) for event in case["events"]]
            assert_same_lines(Simulation(config), Simulation(config), lines)


@settings(max_examples=300, deadline=None)
@given(config=configs, batch=st.lists(events | json_values, min_size=1, max_size=4))
def test_simulate_lines_of_generated_events(config: dict[str, Any], batch: list[Any]) -> None:
    try:
        loaded = load_config(config)
    except ConfigError:
        return
    lines = [json.dumps(raw) for raw in batch]
    assert_same_lines(Simulation(loaded.config), Simulation(loaded.config), lines)


plain_values = st.recursive(leaves.filter(lambda leaf: leaf is not UNDEFINED),
                            lambda children: st.lists(children, max_size=4)
                            | st.dictionaries(texts, children, max_size=4), max_leaves=16)


@settings(max_examples=3000, deadline=None)
@given(value=plain_values)
def test_json_lines_are_the_same_json_values(value: Any) -> None:
    """The dry-run and dead-letter lines: the same JSON value as the general writer, NaN and
    the infinities included (orjson would write them as null), on one line of valid UTF-8."""
    fast, slow = to_json_line(value), standard_json_line(value)
    assert "\n" not in fast
    fast.encode("utf-8")
    # Decoded again and written by the standard library: equal texts mean equal values,
    # NaN in the same places (NaN != NaN as a float), 1 and 1.0 and True told apart.
    assert json.dumps(json.loads(fast), sort_keys=True) == json.dumps(json.loads(slow),
                                                                       sort_keys=True)


def test_an_infinite_number_in_an_event_is_written_as_the_standard_writer_writes_it() -> None:
    """`1e999` parses as infinity (the standard parser; orjson refuses it): its dry-run line
    keeps `Infinity`, where orjson alone would have written `null`."""
    assert to_json_line({"value": float("inf"), "id": None}) == '{"value":Infinity,"id":null}'
    assert to_json_line({"value": float("nan")}) == '{"value":NaN}'
    assert to_json_line({"value": 1.5, "id": "x"}) == '{"value":1.5,"id":"x"}'


def test_numbers_json_cannot_write_are_written_as_before() -> None:
    """Infinity comes in only through the standard parser (orjson refuses 1e999) or the config;
    those records are written by the general writer (`to_json_line`), Infinity included."""
    line = '{"name": "a b", "id": 1e999, "user": {"id": "u"}}'
    assert Simulation({}).step_json(line, now_ms=NOW) == to_json_line(
        Simulation({}).step(line, now_ms=NOW))
    config = {"settings": {"currency": float("inf")},
              "mapping": {"a": {"b": {"settings": {"value": {"value": 5}}}}}}
    written = Simulation(config).step_json('{"name": "a b", "user": {"id": "u"}}', now_ms=NOW)
    assert '"value_currency":Infinity' in written


# ------------------------------------------------------------------------------------------
# Times (the date text of a day is kept once computed)


@settings(max_examples=2000, deadline=None)
@given(timestamp=st.floats(min_value=-62_135_596_800_000, max_value=253_402_300_799_999)
       | st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999))
def test_iso_time_is_pythons_calendar_for_years_1_to_9999(timestamp: float) -> None:
    moment = datetime(1970, 1, 1) + timedelta(milliseconds=int(timestamp))
    expected = moment.isoformat(timespec="milliseconds") + "Z"
    assert iso_time(timestamp) == expected
    assert iso_time(timestamp) == expected  # the second time from the kept date


# ------------------------------------------------------------------------------------------
# Compiled mapping Values: what lets a built list or object skip the final property check
# (mapping._compile_item)


callbacks = st.sampled_from([lambda value, context: None, lambda value, context: float("nan"),
                             lambda value, context: [1, None], lambda value, context: value,
                             lambda value, context: {"a": UNDEFINED, "b": [float("nan")]}])


@settings(max_examples=500, deadline=None)
@given(mapping=mapping_values(), fn=callbacks, event=events)
def test_every_compiled_value_gives_a_property_or_undefined(mapping: Any, fn: Any,
                                                            event: dict[str, Any]) -> None:
    """Only a consent-denied item's static value is given as is; anything else, lists and
    objects built of such values included, is a valid property or undefined."""
    for value in (mapping, {"map": {"a": mapping, "b": {"fn": fn}}},
                  {"loop": ["this", {"fn": fn}]}, {"set": [mapping, {"fn": fn}, None]}):
        result = compile_value(value)(event, event, None)
        if not _gives_raw_static(value):
            assert result is UNDEFINED or is_property(result)


# ------------------------------------------------------------------------------------------
# Rule lookup, kept per event name when no rule has a condition


def test_rules_found_per_name_are_those_find_rule_finds() -> None:
    rules = {"product": {"view": {"name": "V"}, "*": {"name": "P"}}, "*": {"*": {"name": "A"}}}
    config = MappingConfig({"mapping": rules})
    names = [f"product {i % 3}" for i in range(3000)] + [f"n{i} x" for i in range(3000)] + \
        ["product view", "a", "", "product view"]
    for name in names:
        rule, key = config.find({"name": name})
        expected, expected_key = find_rule({"name": name}, rules)
        assert (rule.rule if rule else None, key) == (expected, expected_key)


def test_rules_with_conditions_are_found_for_each_event() -> None:
    rules = {"order": {"complete": [{"condition": lambda event, context: event["data"]["big"],
                                     "name": "Big"}, {"name": "Small"}]}}
    config = MappingConfig({"mapping": rules})
    for big in (True, False, True, False):
        rule, _ = config.find({"name": "order complete", "data": {"big": big}})
        assert rule is not None and rule.rule["name"] == ("Big" if big else "Small")


# ------------------------------------------------------------------------------------------
# Path lookups: objects all the way down take a short path


path_keys = st.sampled_from(["a", "b", "0", "*", "length", ""])
nested = st.recursive(leaves | st.just(float("nan")),
                      lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(path_keys, children, max_size=3), max_leaves=10)


@settings(max_examples=2000, deadline=None)
@given(value=nested, keys=st.lists(path_keys, min_size=1, max_size=4),
       static=st.just(UNDEFINED) | st.integers() | st.none())
def test_path_lookups_are_the_general_walk(value: Any, keys: list[str], static: Any) -> None:
    path = ".".join(keys)
    assume(path)  # an empty path is the value itself, not a lookup
    mapping = path if static is UNDEFINED else {"key": path, "value": static}
    expected = UNDEFINED if value is UNDEFINED else mapping_module._finish(
        get_by_path(value, path, static), static)
    got = compile_value(mapping)(value, value, None)
    assert got == expected or (got != got and expected != expected)


def test_simulate_imports_neither_beam_nor_the_sdk() -> None:
    """simulate's start-up is part of its whole-process rate: the modules it loads must not pull
    in Beam or the Klaviyo SDK (a single import of either costs more than 10,000 events)."""
    import subprocess
    import sys

    code = ("import sys, io, pipeline.cli, pipeline.simulate; "
            "sys.stdin = io.TextIOWrapper(io.BytesIO(b'')); "
            "pipeline.cli.main(['simulate', '--config', 'examples/flow.json', '--input', '-']); "
            "print(sorted(m for m in ('apache_beam', 'klaviyo_api') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=EXAMPLES.parent).stdout.strip()
    assert loaded == "[]"
