"""Planning Klaviyo calls for one walkerOS event, as the walkerOS Klaviyo destination would.

This is the reference `push` (walkeros.md §6.2) minus the network: the consent gate and mapping
(walkerOS semantics), then identity, the identify body, the event body with `value`,
`value_currency` and `unique_id`, in Klaviyo's snake_case wire format, plus pre-flight problems.
Whether the identify body is really sent is the identify state's decision (identify_state.py),
made later per profile key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from transforms.klaviyo.preflight import event_problems, profile_problems
from transforms.klaviyo.wire import CREATE_EVENT, CREATE_OR_UPDATE_PROFILE, iso_time
from transforms.walkeros.event import InvalidEvent, destination_view, parse_event
from transforms.walkeros.jsvalues import (
    UNDEFINED,
    is_finite_number,
    js_number_to_string,
    to_json_value,
    truthy,
)
from transforms.walkeros.mapping import (
    CompiledRule,
    MappingConfig,
    Resolver,
    compile_value,
    granted_consent,
    process_event_mapping,
)

# Skip reasons: counted outcomes, never dead letters (except invalid_event).
IGNORED = "ignored"
NO_IDENTIFIER = "no_identifier"
CONSENT = "consent"
INVALID_EVENT = "invalid_event"

_IDENTIFIERS = (("email", "email"), ("externalId", "external_id"), ("phoneNumber", "phone_number"))
_PROFILE_ATTRIBUTES = (("firstName", "first_name"), ("lastName", "last_name"),
                       ("organization", "organization"), ("title", "title"),
                       ("image", "image"), ("location", "location"))
_SETTING_DEFAULTS = {"email": "user.email", "externalId": "user.id", "uniqueId": "id"}
# port.md D3: an ASCII decimal literal, nothing else ("1_000", "inf", "0x1A" are not numbers).
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


@dataclass(frozen=True)
class Call:
    """One Klaviyo request body in wire format; `problems` send it to the dead letters instead."""

    method: str
    body: dict[str, Any]
    problems: tuple[str, ...] = ()


@dataclass
class EventPlan:
    """Everything one event asks of Klaviyo, before the identify-state decision."""

    event_id: Any = None
    skipped: str | None = None
    profile_key: str | None = None
    timestamp_ms: float | None = None
    profile: Call | None = None  # a candidate upsert; identify_state decides whether it is sent
    event: Call | None = None
    warnings: list[str] = field(default_factory=list)

    def calls(self, *, send_profile: bool) -> list[Call]:
        """The calls to make, the upsert first, once the identify state has decided on it."""
        profile = [self.profile] if send_profile and self.profile is not None else []
        return profile + ([self.event] if self.event is not None else [])

    @property
    def problems(self) -> list[str]:
        """Pre-flight problems of each call, then warnings (the `simulate` `problems` list)."""
        calls = [call for call in (self.profile, self.event) if call is not None and call.problems]
        return [f"{call.method}: {text}" for call in calls for text in call.problems] + \
            self.warnings


def _identifier(value: Any, *, numbers: bool) -> str | None:
    """A non-empty string, or (for external ids and unique ids) a finite number in JS form."""
    if value.__class__ is str:
        return value or None
    if numbers and is_finite_number(value):
        return js_number_to_string(value)
    return value if isinstance(value, str) and value else None


def parse_value(value: Any) -> float | int | None:
    """`value` under port.md D3: a finite number (not a bool) or an ASCII decimal string."""
    if is_finite_number(value):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        number = float(value.strip())
        return number if math.isfinite(number) else None
    return None


class Planner:
    """Plans the calls for events under one Klaviyo destination config (a validated dict with
    `settings`, `mapping`, `data`, `policy`, `include`, `consent`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.mapping = MappingConfig(config)
        raw = config.get("settings") or {}
        settings = {**raw, **{name: default for name, default in _SETTING_DEFAULTS.items()
                              if raw.get(name) is None}}
        self.currency = settings.get("currency")
        # "given ?? default" then a truthiness check: null takes the default, "" disables.
        self.identifiers: list[tuple[str, Resolver, bool]] = [
            (wire_name, compile_value(settings[name]), name == "externalId")
            for name, wire_name in _IDENTIFIERS if truthy(settings.get(name))]
        self.identify = compile_value(settings["identify"]) if "identify" in settings else None
        self.unique_id = compile_value(settings["uniqueId"])

    def plan(
        self,
        raw: bytes | str | dict[str, Any],
        *,
        now_ms: float,
        message_id: str | None = None,
        publish_time_ms: float | None = None,
    ) -> EventPlan:
        """Plan one event. `now_ms` is the processing time; a Pub/Sub message's id and publish
        time stand in for a missing event id (D4) and a missing or 0 timestamp (D5)."""
        parsed = parse_event(raw)
        if isinstance(parsed, InvalidEvent):
            return EventPlan(skipped=INVALID_EVENT, warnings=[parsed.reason])
        return self.plan_event(parsed, now_ms=now_ms, message_id=message_id,
                               publish_time_ms=publish_time_ms)

    def plan_event(
        self,
        parsed: dict[str, Any],
        *,
        now_ms: float,
        message_id: str | None = None,
        publish_time_ms: float | None = None,
    ) -> EventPlan:
        """Plan an event that `parse_event` already accepted (the pipeline's parse stage)."""
        granted = granted_consent(self.mapping.config.get("consent", UNDEFINED), {},
                                  parsed.get("consent"))
        fallback_time = publish_time_ms if publish_time_ms is not None else now_ms
        view = destination_view(parsed, granted or {}, fallback_timestamp_ms=fallback_time,
                                message_id=message_id)
        plan = EventPlan(event_id=view["id"])
        if granted is None:
            plan.skipped = CONSENT
            return plan
        mapped = process_event_mapping(view, self.mapping)
        if mapped.ignore:
            plan.skipped = IGNORED
            return plan
        return self._plan_push(plan, mapped.event, mapped.data, mapped.rule, now_ms,
                               fallback_time)

    def _plan_push(self, plan: EventPlan, event: dict[str, Any], data: Any,
                   rule: CompiledRule | None, now_ms: float, fallback_time: float) -> EventPlan:
        """The reference destination's `push`, as data (walkeros.md §6.2)."""
        found: Any = event.get("timestamp")
        if found.__class__ is int and found:  # the usual case: JSON integer milliseconds
            timestamp = float(found)
        elif truthy(found) and not is_finite_number(found):
            plan.skipped = INVALID_EVENT
            plan.warnings.append(f"timestamp after policy is not a number: {found!r}")
            return plan
        else:
            timestamp = float(found) if truthy(found) else fallback_time
        plan.timestamp_ms = timestamp

        profile: dict[str, str] = {}
        for wire_name, resolve, numbers in self.identifiers:
            resolved = _identifier(resolve(event, event, None), numbers=numbers)
            if resolved is not None:
                profile[wire_name] = resolved
        if not profile:
            plan.skipped = NO_IDENTIFIER
            return plan
        plan.profile_key = profile.get("external_id") or profile.get("email") or \
            profile.get("phone_number")

        raw_rule = rule.rule if rule is not None else {}
        # Rule settings hold no nulls: `rule.settings.x ?? settings.x` (CompiledRule).
        rule_settings = rule.settings if rule is not None else {}
        identify = rule_settings.get("identify", self.identify)
        if identify is not None:
            resolved = identify(event, event, None)
            if isinstance(resolved, dict):
                plan.profile = self._profile_call(profile, resolved)

        if raw_rule.get("silent") is not True:
            plan.event = self._event_call(plan, event, data, raw_rule, rule_settings, profile,
                                          timestamp, now_ms)
        return plan

    def _profile_call(self, profile: dict[str, str], resolved: dict[str, Any]) -> Call:
        attributes: dict[str, Any] = dict(profile)
        for name, wire_name in _PROFILE_ATTRIBUTES:
            if resolved.get(name, UNDEFINED) is not UNDEFINED:
                attributes[wire_name] = resolved[name]
        if isinstance(resolved.get("properties"), dict):
            attributes["properties"] = resolved["properties"]
        body = {"data": {"type": "profile", "attributes": to_json_value(attributes)}}
        return Call(CREATE_OR_UPDATE_PROFILE, body, tuple(profile_problems(body)))

    def _event_call(self, plan: EventPlan, event: dict[str, Any], data: Any,
                    rule: dict[str, Any], rule_settings: dict[str, Resolver],
                    profile: dict[str, str], timestamp: float, now_ms: float) -> Call:
        name = rule.get("name")
        if not isinstance(name, str):
            name = event.get("name", UNDEFINED)
        # A policy can leave the name undefined: left out, as JSON.stringify does (pre-flight
        # then flags the body, which Klaviyo would refuse).
        metric = {} if name is UNDEFINED else {"name": name}
        attributes: dict[str, Any] = {
            "profile": {"data": {"type": "profile", "attributes": dict(profile)}},
            "metric": {"data": {"type": "metric", "attributes": metric}},
            "properties": to_json_value(data) if isinstance(data, dict) else {},
            "time": iso_time(timestamp),
        }
        if "value" in rule_settings:
            resolved = rule_settings["value"](event, event, None)
            value = parse_value(resolved)
            if value is not None:
                attributes["value"] = value
                if truthy(self.currency):
                    attributes["value_currency"] = self.currency
            elif resolved is not UNDEFINED:
                plan.warnings.append(f"value {resolved!r} is not a number: sent without value")
        unique_id = _identifier(rule_settings.get("uniqueId", self.unique_id)(event, event, None),
                                numbers=True)
        if unique_id is not None:
            attributes["unique_id"] = unique_id
        body = {"data": {"type": "event", "attributes": attributes}}
        return Call(CREATE_EVENT, body, tuple(event_problems(body, timestamp, now_ms)))
