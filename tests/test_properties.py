"""Property tests: arbitrary JSON events and configs never make the planner raise.

They give a plan, a skip reason, or (for the config) a clear ConfigError.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.simulate import Simulation
from transforms.walkeros.config import ConfigError, load_config

SECTIONS = ["data", "user", "globals", "context", "consent", "nested", "custom", "source"]
PATHS = st.sampled_from(["data.id", "data.total", "user.id", "user.email", "nested.*.data.id",
                         "nested.0.data", "", "name", "consent", "data", "globals.x", "*",
                         "context.stage.0", "data.items.length"]) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=8)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=6), children, max_size=4),
                           max_leaves=12)


def mapping_values() -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.fixed_dictionaries({}, optional={
            "key": PATHS, "value": scalars, "map": st.dictionaries(st.text(max_size=5), children,
                                                                   max_size=3),
            "loop": st.tuples(st.just("this") | PATHS, children).map(list),
            "set": st.lists(children, max_size=3),
            "consent": st.dictionaries(st.sampled_from(["marketing", "analytics"]), st.booleans()),
        }) | st.lists(children, max_size=3)
    return st.recursive(PATHS | st.integers() | st.booleans(), extend, max_leaves=10)


events = st.fixed_dictionaries(
    {"name": st.sampled_from(["order complete", "product view", "user login", "a b c", "x",
                              " a b", ""]) | st.text(max_size=10)},
    optional={section: json_values for section in SECTIONS}
    | {"id": json_values, "timestamp": json_values | st.floats(),
       "user": st.fixed_dictionaries({}, optional={"id": scalars, "email": scalars})},
)
rules = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=6) | scalars, "data": mapping_values(), "ignore": st.booleans(),
    "silent": st.booleans(), "include": st.lists(st.sampled_from(SECTIONS + ["all", "event"])),
    "remove": st.lists(PATHS, max_size=2), "policy": st.dictionaries(PATHS, mapping_values(),
                                                                      max_size=2),
    "settings": st.fixed_dictionaries({}, optional={
        "identify": mapping_values(), "value": mapping_values(), "uniqueId": mapping_values()}),
})
configs = st.fixed_dictionaries({}, optional={
    "settings": st.fixed_dictionaries({}, optional={
        name: mapping_values() | st.none() for name in
        ("email", "externalId", "phoneNumber", "identify", "uniqueId")}
        | {"currency": st.sampled_from(["EUR", None, 5])}),
    "mapping": st.dictionaries(st.sampled_from(["order", "product", "user", "*", "a"]),
                               st.dictionaries(st.sampled_from(["complete", "view", "*", "b"]),
                                               rules | st.lists(rules, max_size=2), max_size=2),
                               max_size=3),
    "data": mapping_values(), "policy": st.dictionaries(PATHS, mapping_values(), max_size=2),
    "include": st.lists(st.sampled_from(SECTIONS + ["all", "event", "bogus"]), max_size=3),
    "consent": st.dictionaries(st.sampled_from(["marketing", "analytics"]), st.booleans()),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, batch=st.lists(events | json_values, min_size=1, max_size=4))
def test_planner_never_raises(config: dict[str, Any], batch: list[Any]) -> None:
    try:
        loaded = load_config(config)
    except ConfigError as error:
        assert str(error)
        return
    simulation = Simulation(loaded.config)
    for raw in batch:
        record = simulation.step(json.dumps(raw), now_ms=1_764_400_000_000)
        assert record["skipped"] in (None, "ignored", "no_identifier", "consent", "invalid_event")
        json.dumps(record["calls"], allow_nan=False)  # wire bodies are plain JSON
        for method, body in record["calls"]:
            assert method in ("create_event", "create_or_update_profile")
            assert body["data"]["type"] in ("event", "profile")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_bytes_are_invalid_events_or_plans(raw: bytes | str) -> None:
    record = Simulation({}).step(raw, now_ms=1_764_400_000_000)
    assert record["skipped"] in (None, "no_identifier", "invalid_event")
