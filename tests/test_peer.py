"""The peer suite: walkerOS 4.4.0's own tests, restated as data in `tests/peer/*.json`, run
against this port.

Each file names the walkerOS test file it restates (`source`), holds its `cases` (input,
mapping or config, and the expectation as the walkerOS test asserts it) and lists every test it
`left_out`, with the reason. A case that this port answers differently on purpose carries the
port.md number (`deliberate: ["D6"]`) and what the port does instead.

Markers in the data: `{"$undefined": true}` is JavaScript `undefined`; `{"$event": name,
"props": {…}}` and `{"$create_event": {…}}` are walkerOS's `getEvent` / `createEvent` fixtures
(tests/peer/fixtures.py); `"$py:module:function"` is a Python callable (port.md D7), here the
restated JavaScript functions of tests/peer/callables.py; `{"$any": "object"}` (or `"string"`)
matches any value of that type, as jest's `expect.any` does.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.simulate import Simulation
from tests.conformance import json_equal
from tests.peer import callables
from tests.peer.fixtures import create_event, get_event
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.klaviyo.plan import CONSENT, IGNORED, Planner
from transforms.walkeros import mapping as engine
from transforms.walkeros.config import import_callable, load_config
from transforms.walkeros.event import destination_view
from transforms.walkeros.jsvalues import UNDEFINED, truthy

PEER_DIR = Path(__file__).resolve().parent / "peer"
NOW_MS = 1_764_400_000_000
LEFT_OUT_CATEGORIES = {
    "async",            # awaits, promise ordering, event-loop ticks
    "collector",        # collector internals: status counters, queues, observers, init, on()
    "js-runtime",       # Symbol, Proxy, Map, Date, realms, prototypes, mutability options
    "fatal-error",      # walkerOS's FatalError class, which escapes mapping on purpose
    "later-release",    # the stored text asserts a behaviour walkerOS changed after 4.4.0
    "earlier-release",  # the stored text is of a release before 4.0.0 (event model v3)
    "duplicate",        # the same assertions as another restated test
    "not-applicable",   # sources and other parts this destination port does not have
    "deliberate",       # port.md D1–D9: this port differs on purpose
    "missing",          # no such test file in walkerOS's stored repository
}
DELIBERATE = {f"D{n}" for n in range(1, 10)}


def _load() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(PEER_DIR.glob("*.json")):
        with open(path, encoding="utf-8") as handle:
            documents.append((path.name, json.load(handle)))
    return documents


DOCUMENTS = _load()
CASES = [pytest.param(case, id=f"{name}:{case['id']}")
         for name, document in DOCUMENTS for case in document["cases"]]


# --------------------------------------------------------------------------------------------
# Markers and comparisons


def decode(value: Any) -> Any:
    """The JSON of a case as Python values (see the module docstring for the markers)."""
    if isinstance(value, str) and value.startswith("$py:"):
        return import_callable(value, "peer case")
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if value.get("$undefined") is True:
        return UNDEFINED
    if "$event" in value:
        return get_event(value["$event"], decode(value.get("props", {})))
    if "$create_event" in value:
        return create_event(decode(value["$create_event"]))
    return {key: decode(item) for key, item in value.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def strict_equal(got: Any, want: Any) -> bool:
    """jest's `toBe` / `toStrictEqual` for JSON-like values: `undefined` members count, a bool is
    not a number, 1 equals 1.0 (JavaScript has one number type), `{"$any": …}` matches a type."""
    if isinstance(want, dict) and set(want) == {"$any"}:
        return isinstance(got, {"object": dict, "string": str, "array": list}[want["$any"]])
    if _is_number(want) or _is_number(got):
        return _is_number(got) and _is_number(want) and got == want
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(
            strict_equal(got[key], item) for key, item in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            strict_equal(g, w) for g, w in zip(got, want, strict=True))
    if callable(want):
        return got is want
    return type(got) is type(want) and got == want


def _without_undefined(value: Any) -> Any:
    if isinstance(value, dict) and set(value) != {"$any"}:
        return {k: _without_undefined(v) for k, v in value.items() if v is not UNDEFINED}
    if isinstance(value, list):
        return [_without_undefined(v) for v in value]
    return value


def loose_equal(got: Any, want: Any) -> bool:
    """jest's `toEqual`: like `toStrictEqual`, but undefined object members are ignored."""
    return strict_equal(_without_undefined(got), _without_undefined(want))


def matches(got: Any, want: Any) -> bool:
    """jest's `toMatchObject` / `objectContaining`: `want`'s members, recursively."""
    if isinstance(want, dict) and set(want) != {"$any"}:
        return isinstance(got, dict) and all(
            key in got and matches(got[key], item) for key, item in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            matches(g, w) for g, w in zip(got, want, strict=True))
    return loose_equal(got, want)


COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "is": strict_equal, "equals": loose_equal, "matches": matches}


def at(value: Any, path: str) -> Any:
    """A dotted path into a result, reading members only (UNDEFINED when missing)."""
    for key in path.split(".") if path else []:
        if isinstance(value, dict):
            value = value.get(key, UNDEFINED)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return UNDEFINED
    return value


def check_expectations(result: Any, expectations: list[dict[str, Any]]) -> None:
    """`[{"at": path, "is"|"equals"|"matches": value}, {"at": path, "has_key"|"lacks_key": k}]`."""
    for expectation in expectations:
        found = at(result, expectation.get("at", ""))
        if "has_key" in expectation:
            assert isinstance(found, dict) and expectation["has_key"] in found, expectation
            continue
        if "lacks_key" in expectation:
            assert isinstance(found, dict) and expectation["lacks_key"] not in found, expectation
            continue
        (how, want), = ((k, v) for k, v in expectation.items() if k in COMPARE)
        assert COMPARE[how](found, decode(want)), f"{expectation}: got {found!r}"


def check_calls(case: dict[str, Any]) -> None:
    """What the case asserts of its callbacks: call counts and arguments (jest mocks)."""
    for name, count in case.get("calls", {}).items():
        assert len(callables.CALLS[name]) == count, f"{name} called {callables.CALLS[name]}"
    for spec in case.get("called_with", []):
        recorded = callables.CALLS[spec["name"]]
        assert recorded, f"{spec['name']} was not called"
        value, context = recorded[spec.get("call", -1)]
        if "value" in spec:
            assert loose_equal(value, decode(spec["value"])), f"{spec}: value {value!r}"
        for field, want in spec.get("context", {}).items():
            assert matches(getattr(context, field), decode(want)), f"{spec}: {field}"


# --------------------------------------------------------------------------------------------
# Runners, one per kind of case


def _event_of(case: dict[str, Any], value: Any) -> Any:
    """The callback context's event: the given one, else the value when it is an object
    (walkerOS: `context.event ?? (isObject(value) ? value : {})`)."""
    if "event" in case:
        return decode(case["event"])
    return value if isinstance(value, dict) else {}


def run_value(case: dict[str, Any]) -> Any:
    """`getMappingValue(value, mapping, {collector, event, consent})`. The port has no
    collector: its consent is passed as the caller's, as walkerOS falls back to it."""
    value = decode(case["value"])
    given = decode(case.get("consent", UNDEFINED))
    consent = given if truthy(given) else decode(case.get("collector_consent", UNDEFINED))
    context = engine.MappingContext(_event_of(case, value), None, consent)
    result = engine.get_mapping_value(value, decode(case.get("mapping", UNDEFINED)), context)
    assert COMPARE[case.get("compare", "is")](result, decode(case["expected"])), \
        f"got {result!r}"
    return result


def run_rule(case: dict[str, Any]) -> Any:
    rule, key = engine.find_rule(decode(case["event"]), decode(case["rules"]))
    want = case["expected"]
    assert strict_equal(UNDEFINED if rule is None else rule, decode(want["rule"])), rule
    assert key == want["key"]


def _mapped(event: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    mapped = engine.process_event_mapping(event, engine.MappingConfig(config))
    return {"event": mapped.event, "data": mapped.data, "ignore": mapped.ignore,
            "silent": mapped.silent, "mapping_key": mapped.mapping_key,
            "rule": mapped.rule.rule if mapped.rule is not None else UNDEFINED}


def run_process(case: dict[str, Any]) -> Any:
    check_expectations(_mapped(decode(case["event"]), decode(case["config"])), case["expect"])


def run_destination(case: dict[str, Any]) -> Any:
    """A destination of the collector's tests: whether `push` is reached (the consent gate and
    `ignore`), and the event and data it receives."""
    event, config = decode(case["event"]), decode(case["config"])
    plan = Planner(config).plan_event(copy.deepcopy(event), now_ms=NOW_MS)
    required = config.get("consent", UNDEFINED)
    granted = engine.granted_consent(required, {}, event.get("consent")) or {}
    result = _mapped(destination_view(event, granted, fallback_timestamp_ms=NOW_MS), config)
    result["pushed"] = plan.skipped not in (CONSENT, IGNORED)
    result["skipped"] = plan.skipped
    check_expectations(result, case["expect"])


def run_include(case: dict[str, Any]) -> Any:
    result = engine.flatten_include(decode(case["event"]), case["sections"])
    if "expected" in case:
        assert strict_equal(result, decode(case["expected"])), result
    check_expectations(result, case.get("expect", []))


def run_get_path(case: dict[str, Any]) -> Any:
    args = [decode(case["value"]), case["path"]] + (
        [decode(case["default"])] if "default" in case else [])
    result = engine.get_by_path(*args)
    assert strict_equal(result, decode(case["expected"])), result


def run_set_path(case: dict[str, Any]) -> Any:
    value = decode(case["value"])
    before = copy.deepcopy(value)
    result = engine.set_by_path(value, case["path"], decode(case["new"]))
    assert loose_equal(value, before) and result is not value  # the input is left alone
    check_expectations(result, case["expect"])


def run_delete_path(case: dict[str, Any]) -> Any:
    value = decode(case["value"])
    before = copy.deepcopy(value)
    result = engine.delete_by_path(value, case["path"])
    assert strict_equal(value, before)
    assert strict_equal(result, decode(case["expected"])), result


def run_consent(case: dict[str, Any]) -> Any:
    args = [decode(case.get(name)) for name in ("required", "state", "individual")]
    result = engine.granted_consent(*args)
    want = decode(case["expected"])
    assert (result is None) if want is False else strict_equal(result, want), result


_SDK_METHODS = {"create_event": "eventsApi.createEvent",
                "create_or_update_profile": "profilesApi.createOrUpdateProfile"}


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda match: match.group(1).upper(), name)


def sdk_call(method: str, body: dict[str, Any]) -> list[Any]:
    """A planned wire call in the shape the walkerOS destination hands the `klaviyo-api` SDK:
    `[callable, body]`, attribute names in camelCase (the SDK writes them snake_case)."""
    body = copy.deepcopy(body)
    attributes = body["data"]["attributes"]
    renamed = {_camel(key): value for key, value in attributes.items()}
    profile = renamed.get("profile")
    if isinstance(profile, dict):
        profile["data"]["attributes"] = {
            _camel(key): value for key, value in profile["data"]["attributes"].items()}
    body["data"]["attributes"] = renamed
    return [_SDK_METHODS[method], body]


def run_klaviyo(case: dict[str, Any]) -> Any:
    """stepExamples.test.ts: settings `{email: 'user.email', externalId: 'user.id',
    …example.settings}`, the rule at `{entity: {action: rule}}`, one event, the SDK calls."""
    event = decode(case["event"])
    settings = {"email": "user.email", "externalId": "user.id", **decode(case.get("settings", {}))}
    config: dict[str, Any] = {"settings": {k: v for k, v in settings.items()
                                           if v is not UNDEFINED}}
    if "rule" in case:
        config["mapping"] = {event["entity"]: {event["action"]: decode(case["rule"])}}
    step = Simulation(load_config(config).config).step(event, now_ms=NOW_MS)
    got = [sdk_call(method, body) for method, body in step["calls"]]
    assert json_equal(got, case["expected"]), json.dumps(got)
    for text in case.get("port_problems", []):
        assert any(text in problem for problem in step["problems"]), step["problems"]


def run_init(case: dict[str, Any]) -> Any:
    """init.test.ts: a destination without an API key refuses to start (here: the sink, where
    the key is read; `simulate` needs none, port.md §3)."""
    settings = load_config(case["config"]).config["settings"]
    source = ApiKeySource.from_options(secret_version=None, option_key=None,
                                       config_api_key=settings.get("apiKey"))
    assert not source.configured({})
    with pytest.raises(KlaviyoConfigurationError, match=case["raises"]):
        source.resolve({})


RUNNERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "value": run_value, "rule": run_rule, "process": run_process,
    "destination": run_destination, "include": run_include, "get_path": run_get_path,
    "set_path": run_set_path, "delete_path": run_delete_path, "consent": run_consent,
    "klaviyo": run_klaviyo, "init": run_init}


@pytest.mark.parametrize("case", CASES)
def test_peer_case(case: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    callables.CALLS.clear()
    with caplog.at_level(logging.WARNING, logger="transforms.walkeros.mapping"):
        RUNNERS[case["kind"]](case)
    check_calls(case)
    for message in case.get("logs", []):
        assert any(message in record.getMessage() for record in caplog.records), message


# --------------------------------------------------------------------------------------------
# The suite itself


def test_every_document_names_its_source_and_accounts_for_what_it_leaves_out() -> None:
    for name, document in DOCUMENTS:
        assert document["source"]["repo"] == "elbwalker/walkerOS", name
        assert document["source"]["path"] and document["source"]["text"], name
        for left in document.get("left_out", []):
            assert left["test"] and left["reason"], (name, left)
            assert left["category"] in LEFT_OUT_CATEGORIES, (name, left)
            if left["category"] == "deliberate":
                assert set(left["deliberate"]) <= DELIBERATE, (name, left)


def test_case_ids_are_unique_and_kinds_known() -> None:
    ids = [(name, case["id"]) for name, document in DOCUMENTS for case in document["cases"]]
    assert len(ids) == len(set(ids))
    assert {case["kind"] for _, d in DOCUMENTS for case in d["cases"]} <= set(RUNNERS)
    for _, document in DOCUMENTS:
        for case in document["cases"]:
            assert set(case.get("deliberate", [])) <= DELIBERATE, case["id"]


def summary() -> dict[str, Any]:
    """Cases and left-out tests per file and per reason (printed by `python -m tests.test_peer`)."""
    reasons: dict[str, int] = {}
    files = {}
    for name, document in DOCUMENTS:
        left = document.get("left_out", [])
        files[name] = {"cases": len(document["cases"]), "left_out": len(left)}
        for entry in left:
            reasons[entry["category"]] = reasons.get(entry["category"], 0) + 1
    return {"cases": sum(f["cases"] for f in files.values()),
            "left_out": sum(f["left_out"] for f in files.values()),
            "by_reason": reasons, "files": files}


if __name__ == "__main__":
    print(json.dumps(summary(), indent=2))
