"""Klaviyo planning: identity, identify bodies, event bodies, D1–D6, pre-flight, SDK models."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_client.models import EventCreateQueryV2, ProfileUpsertQuery

from pipeline.bench import EXAMPLES
from pipeline.simulate import Simulation
from transforms.klaviyo.identify_state import Verdict, decide
from transforms.klaviyo.plan import (
    CONSENT,
    IGNORED,
    INVALID_EVENT,
    NO_IDENTIFIER,
    Planner,
    parse_value,
)
from transforms.walkeros.config import load_config_file

NOW = 1_764_400_000_000
TS = 1_722_470_400_000


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "order complete", "id": "e1", "timestamp": TS,
                            "user": {"id": "u1", "email": "a@example.org"},
                            "data": {"total": 12.5, "id": "ORD-1"}}
    return base | fields


def plan(config: dict[str, Any], raw: Any, **options: Any) -> Any:
    return Planner(config).plan(raw, now_ms=NOW, **options)


def test_default_identity_body_and_unique_id() -> None:
    result = plan({}, event())
    body = result.event.body["data"]["attributes"]
    assert body["profile"]["data"]["attributes"] == {"email": "a@example.org", "external_id": "u1"}
    assert body["metric"]["data"]["attributes"]["name"] == "order complete"
    assert body["properties"] == {} and body["unique_id"] == "e1"
    assert body["time"] == "2024-08-01T00:00:00.000Z"
    assert result.profile is None and result.profile_key == "u1"


def test_value_currency_and_rule_unique_id() -> None:
    config = {"settings": {"currency": "EUR"}, "mapping": {"order": {"complete": {
        "name": "Placed Order", "settings": {"value": "data.total", "uniqueId": "data.id"}}}}}
    body = plan(config, event()).event.body["data"]["attributes"]
    assert (body["value"], body["value_currency"], body["unique_id"]) == (12.5, "EUR", "ORD-1")


@pytest.mark.parametrize(("raw", "parsed"), [
    (7, 7), (" 7.5 ", 7.5), ("1e3", 1000.0), ("-3", -3.0), ("1_000", None), ("inf", None),
    ("0x1A", None), ("12abc", None), ("٣", None), (True, None), (float("inf"), None),
    ("1e999", None),
])
def test_value_parsing_is_strict(raw: Any, parsed: Any) -> None:
    assert parse_value(raw) == parsed


def test_rejected_value_is_a_counted_warning() -> None:
    config = {"mapping": {"order": {"complete": {"settings": {"value": {"value": "12abc"}}}}}}
    result = plan(config, event())
    assert "value" not in result.event.body["data"]["attributes"]
    assert any("12abc" in warning for warning in result.warnings)


def test_numeric_external_id_becomes_its_js_string() -> None:
    result = plan({}, event(user={"id": 4711}))
    attributes = result.event.body["data"]["attributes"]["profile"]["data"]["attributes"]
    assert attributes == {"external_id": "4711"}


def test_empty_string_disables_and_null_keeps_the_default() -> None:
    only_email = plan({"settings": {"externalId": ""}}, event())
    assert only_email.profile_key == "a@example.org"
    default = plan({"settings": {"externalId": None}}, event())
    assert default.profile_key == "u1"


def test_skips_are_reasons_not_errors() -> None:
    assert plan({}, event(user={})).skipped == NO_IDENTIFIER
    assert plan({"consent": {"marketing": True}}, event()).skipped == CONSENT
    assert plan({"mapping": {"order": {"complete": {"ignore": True}}}}, event()).skipped == IGNORED
    invalid = plan({}, b'{"name": "order"}')
    assert invalid.skipped == INVALID_EVENT and "entity action" in invalid.warnings[0]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"{", "invalid JSON"), (b"\xff", "not UTF-8"), (b"[]", "JSON object"),
    (b'{"name": "a b", "timestamp": "today"}', "timestamp must be a number"),
    (b'{"name": "a b", "data": null}', "data must be an object"),
    (b'{"name": "a b", "nested": {}}', "nested must be an array"),
    (b'{"name": "a b", "timestamp": NaN}', "NaN is not valid JSON"),
    (b'{"name": "a b", "timestamp": 1e300}', "not a representable time"),
])
def test_invalid_events_say_why(raw: bytes, reason: str) -> None:
    result = plan({}, raw)
    assert result.skipped == INVALID_EVENT and reason in result.warnings[0]


def test_missing_id_and_timestamp_use_pubsub_message_then_digest() -> None:
    raw = {"name": "a b", "user": {"id": "u"}}
    from_message = plan({}, raw, message_id="m-1", publish_time_ms=TS)
    attributes = from_message.event.body["data"]["attributes"]
    assert attributes["unique_id"] == "m-1" and attributes["time"] == "2024-08-01T00:00:00.000Z"
    digest = plan({}, raw).event_id
    assert digest == plan({}, dict(raw)).event_id and len(digest) == 16


def test_preflight_flags_old_and_future_times() -> None:
    old = plan({}, event(timestamp=1700000100))
    assert "before 2000-01-01" in old.event.problems[0]
    future = plan({}, event(timestamp=NOW + 400 * 86_400_000))
    assert "more than one year" in future.event.problems[0]


def test_preflight_flags_profile_fields_the_sdk_would_refuse() -> None:
    config = {"settings": {"identify": {"map": {"firstName": {"value": 5},
                                                "location": {"value": "Berlin"}}}}}
    problems = plan(config, event()).profile.problems
    assert any("first_name" in text for text in problems)
    assert any("location" in text for text in problems)


def test_profile_body_keeps_only_klaviyo_attributes() -> None:
    config = {"settings": {"identify": {"map": {
        "firstName": {"value": "Jane"}, "company": {"value": "Acme"},
        "properties": {"map": {"plan": {"value": "pro"}}}}}}}
    attributes = plan(config, event()).profile.body["data"]["attributes"]
    assert attributes == {"email": "a@example.org", "external_id": "u1", "first_name": "Jane",
                          "properties": {"plan": "pro"}}


def test_silent_rules_identify_without_tracking() -> None:
    config = {"mapping": {"user": {"login": {"silent": True, "settings": {
        "identify": {"map": {"lastName": {"value": "Doe"}}}}}}}}
    result = plan(config, event(name="user login"))
    assert result.event is None and result.profile is not None


def test_identify_state_sends_only_real_changes_and_never_older_ones() -> None:
    body_a = {"data": {"attributes": {"first_name": "A", "n": 1}}}
    same_a = {"data": {"attributes": {"n": 1.0, "first_name": "A"}}}
    body_b = {"data": {"attributes": {"first_name": "B"}}}
    state, verdict = decide(None, body_a, 100, timestamp_ms=100)
    assert verdict is Verdict.CHANGED
    state, verdict = decide(state, same_a, 200, timestamp_ms=200)
    assert verdict is Verdict.UNCHANGED and state.newest_ms == 200  # a hint for the sink
    before = state
    state, verdict = decide(state, body_b, 150, timestamp_ms=150)  # older: never overwrites
    assert verdict is Verdict.OLDER and state == before
    state, verdict = decide(state, body_b, 200, timestamp_ms=200)  # equal time is not older
    assert verdict is Verdict.CHANGED


def test_the_replay_of_a_dead_lettered_upsert_is_a_hint_though_a_newer_event_had_its_body() -> None:
    """The upsert of an event dies at the sink; a newer event with the same body is UNCHANGED
    (and its hint settled before the sink knew of the failure). Replayed, the dead letter's
    body is still the body the state holds: it is a hint for the sink, which sends it for the
    dead-lettered profile, not OLDER and dropped."""
    body = {"data": {"attributes": {"first_name": "A"}}}
    state, _ = decide(None, body, 170, timestamp_ms=170)
    state, verdict = decide(state, body, 206, timestamp_ms=206)
    assert verdict is Verdict.UNCHANGED
    after, verdict = decide(state, body, 170, timestamp_ms=170)  # the replay
    assert verdict is Verdict.UNCHANGED and after == state  # the newest time stays
    assert decide(state, {"data": {"attributes": {"first_name": "B"}}}, 170,
                  timestamp_ms=170)[1] is Verdict.OLDER  # another older body still is


def test_planned_bodies_are_accepted_by_the_sdk_models() -> None:
    simulation = Simulation(load_config_file(str(EXAMPLES / "flow.json")).config)
    models = {"create_event": EventCreateQueryV2, "create_or_update_profile": ProfileUpsertQuery}
    checked = 0
    with open(EXAMPLES / "events.jsonl", encoding="utf-8") as lines:
        for line in lines:
            for method, body in simulation.step(line, now_ms=NOW)["calls"]:
                models[method].from_dict(body)
                checked += 1
    assert checked > 10


def test_deeply_nested_input_is_an_invalid_event() -> None:
    result = plan({}, b"[" * 100_000)
    assert result.skipped == INVALID_EVENT and "nested too deeply" in result.warnings[0]


def test_a_policy_that_leaves_the_name_undefined_is_a_problem_not_a_crash() -> None:
    """walkerOS 4.4.0 writes an undefined policy value (`event.name = undefined`); the metric name
    is then left out of the body (JSON.stringify drops it), which Klaviyo refuses: here it is a
    pre-flight problem (a dead letter), not an exception that stops the run."""
    step = Simulation({"policy": {"name": "data.id"}}).step(
        '{"name": "a b", "id": "1", "user": {"id": "u"}}', now_ms=NOW)
    method, body = step["calls"][0]
    assert method == "create_event"
    assert body["data"]["attributes"]["metric"]["data"]["attributes"] == {}
    assert any("metric name" in problem for problem in step["problems"])
