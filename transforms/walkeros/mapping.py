"""The walkerOS mapping language: values, rule lookup and event mapping (walkeros.md §2–§3).

A port of `@walkeros/core` `mapping.ts`, `mappingValue.ts`, `byPath.ts`, `include.ts` and
`consent.ts` (version 4.4.0) with every quirk of walkeros.md §8 kept: configs in the wild depend on
them. Pure functions, no I/O. `UNDEFINED` stands for JavaScript `undefined`; `None` is JSON `null`.

Callbacks (`fn`, `condition`, `validate`) are Python callables `(value, context) -> Any`; the
config loader turns `"$py:module:function"` strings into them.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transforms.walkeros.jsvalues import UNDEFINED, cast_to_property, is_property, truthy

log = logging.getLogger(__name__)

_ARRAY_INDEX = re.compile(r"^(?:0|[1-9][0-9]*)$")


@dataclass(frozen=True)
class MappingContext:
    """What a callback sees as its second argument: the event, the current mapping item, consent."""

    event: Any
    mapping: Any = None
    consent: Any = None


# --------------------------------------------------------------------------------------------
# Paths


def _child(value: Any, key: str) -> Any:
    """`value[key]` as JavaScript reads it for JSON data: objects, arrays (index, length)."""
    if isinstance(value, dict):
        return value.get(key, UNDEFINED)
    if isinstance(value, list):
        if _ARRAY_INDEX.match(key):
            index = int(key)
            return value[index] if index < len(value) else UNDEFINED
        return len(value) if key == "length" else UNDEFINED
    return UNDEFINED


def get_by_path(value: Any, path: str, default: Any = UNDEFINED) -> Any:
    """Dotted-path lookup with `*` wildcards over lists (walkerOS `getByPath`).

    A segment on a primitive (`0`, `false`, `""`, `null`, …) or a missing segment is undefined,
    and undefined falls back to `default`; a path that ends on `null` gives `null`. A `*` on a
    list maps the rest of the path over its elements, filling missing entries with `default`.
    """
    return _walk(value, path.split("."), default)


def _walk(value: Any, keys: list[str], default: Any) -> Any:
    current = value
    for index, key in enumerate(keys):
        if current.__class__ is dict:  # the common case, without the generic lookup
            current = current.get(key, UNDEFINED)
        elif key == "*" and isinstance(current, list):
            rest = keys[index + 1 :] or [""]  # a trailing `*` looks up "" in each element
            return [_walk(item, rest, default) for item in current]
        else:
            current = _child(current, key)  # undefined on a primitive, as in JavaScript
        if current is UNDEFINED:
            break
    return default if current is UNDEFINED else current


def set_by_path(value: dict[str, Any], path: str, new: Any) -> dict[str, Any]:
    """A deep copy of `value` with `new` written at `path` (walkerOS `setByPath`).

    Missing or non-object intermediates are replaced by `{}`. An undefined `new` is still written,
    which clears the key (walkerOS quirk §8.5).
    """
    result = copy.deepcopy(value)
    keys = path.split(".")
    current: Any = result
    for key in keys[:-1]:
        child = _child(current, key)
        if not isinstance(child, dict | list):
            child = {}
            _assign(current, key, child)
        current = child
    _assign(current, keys[-1], new)
    return result


def _assign(container: Any, key: str, new: Any) -> None:
    if isinstance(container, dict):
        container[key] = new
    elif isinstance(container, list) and _ARRAY_INDEX.match(key):
        index = int(key)
        container.extend([UNDEFINED] * (index + 1 - len(container)))
        container[index] = new
    # Other JS property writes (a named key on an array) never reach JSON: nothing to keep.


def delete_by_path(value: Any, path: str) -> Any:
    """A copy of `value` without `path`; a numeric segment removes a list element."""
    result = copy.deepcopy(value)
    keys = path.split(".")
    parent = result
    for key in keys[:-1]:
        parent = _child(parent, key)
        if not isinstance(parent, dict | list):
            return result
    last = keys[-1]
    if isinstance(parent, dict):
        parent.pop(last, None)
    elif isinstance(parent, list) and _ARRAY_INDEX.match(last) and int(last) < len(parent):
        del parent[int(last)]
    return result


# --------------------------------------------------------------------------------------------
# Consent


def granted_consent(required: Any, state: Any, individual: Any = None) -> dict[str, bool] | None:
    """walkerOS `getGrantedConsent`: the map of granted states, or None when not granted.

    `state` and `individual` merge (individual wins per key). The check passes when `required` is
    absent or empty, or when any key it marks true is granted (OR semantics). A `null` required
    never passes: walkerOS starts from `required === undefined` and finds nothing true in null.
    """
    if required is None:
        return None
    merged = individual if not state and isinstance(individual, dict) else {
        **(state if isinstance(state, dict) else {}),
        **(individual if isinstance(individual, dict) else {})}
    granted = {name: True for name, value in merged.items() if value is True or truthy(value)}
    if not isinstance(required, dict) or not required:
        return granted
    for name, wanted in required.items():
        if name in granted and truthy(wanted):
            return granted
    return None


# --------------------------------------------------------------------------------------------
# Values


class _MalformedItem(Exception):
    """A mapping item JavaScript would throw on (e.g. `null`): the whole entry gives undefined."""


# A compiled mapping Value: (value, event, consent) -> result. Configs are compiled once, so
# resolving an event walks closures instead of re-reading mapping dicts (see `bench`).
Resolver = Callable[[Any, Any, Any], Any]


def get_mapping_value(value: Any, mapping: Any, context: MappingContext) -> Any:
    """walkerOS `getMappingValue`: resolve a mapping Value against `value` (compiles it first;
    hot paths keep the result of `compile_value` instead)."""
    return compile_value(mapping)(value, context.event, context.consent)


def compile_value(mapping: Any) -> Resolver:
    """walkerOS `getMappingValue` for one mapping Value, as a function.

    A top-level list is a fallback list: the first entry that resolves to something other than
    undefined wins. Consent comes from `value.consent` when `value` is an object with a truthy
    `consent`, else from the caller.
    """
    entries = [_compile_entry(entry)
               for entry in (mapping if isinstance(mapping, list) else [mapping])]
    if isinstance(mapping, str):
        return entries[0]  # a path lookup: handles undefined itself and cannot be malformed
    if len(entries) == 1 and not _uses_consent(mapping):
        return _single(entries[0])

    def resolve(value: Any, event: Any, consent: Any) -> Any:
        if value is UNDEFINED:
            return UNDEFINED
        if value.__class__ is dict:
            own = value.get("consent")
            if own is not None and truthy(own):
                consent = own
        for entry in entries:
            try:
                result = entry(value, event, consent)
            except _MalformedItem:
                continue
            if result is not UNDEFINED:
                return result
        return UNDEFINED

    return resolve


def _uses_consent(mapping: Any) -> bool:
    """Whether resolving `mapping` can read consent (a consent check or a callback)."""
    if isinstance(mapping, list):
        return any(_uses_consent(item) for item in mapping)
    if not isinstance(mapping, dict):
        return False
    return bool({"consent", "fn", "condition", "validate"} & set(mapping)) or any(
        _uses_consent(item) for item in (mapping.get("map") or {}).values()) or any(
        _uses_consent(mapping.get(name)) for name in ("loop", "set"))


def _single(entry: Resolver) -> Resolver:
    """`compile_value` for one entry that never reads consent: no consent lookup per call."""

    def resolve(value: Any, event: Any, consent: Any) -> Any:
        if value is UNDEFINED:
            return UNDEFINED
        try:
            return entry(value, event, consent)
        except _MalformedItem:
            return UNDEFINED

    return resolve


def _compile_entry(entry: Any) -> Resolver:
    """One fallback entry; a list here is an inner alternative list: first *truthy* wins,
    else the last result."""
    if not isinstance(entry, list):
        return _compile_item(entry)
    items = [_compile_item(item) for item in entry]

    def first_truthy(value: Any, event: Any, consent: Any) -> Any:
        result: Any = UNDEFINED
        for item in items:
            if truthy(result):
                return result
            result = item(value, event, consent)
        return result

    return first_truthy


def _call(callback: Callable[..., Any], what: str, *args: Any) -> Any:
    """Run a user callback; an exception is logged and counts as undefined/false (§2.5)."""
    try:
        return callback(*args)
    except Exception:  # noqa: BLE001 - user code: any failure means "no value"
        log.warning("mapping %s failed", what, exc_info=True)
        return UNDEFINED


def _undefined(value: Any, event: Any, consent: Any) -> Any:
    return UNDEFINED


def _malformed(value: Any, event: Any, consent: Any) -> Any:
    raise _MalformedItem("null mapping item")


def _empty_object(value: Any, event: Any, consent: Any) -> Any:
    return {}


def _finish(result: Any, static: Any) -> Any:
    """Step 10: the result if it is a valid property, else the static value (cast)."""
    kind = result.__class__
    if kind in _SIMPLE or (kind is float and result == result):  # not NaN
        return result
    if result is not UNDEFINED and is_property(result):
        return result
    return cast_to_property(static)


_SIMPLE = frozenset({str, int, bool})


def _compile_path(path: str, static: Any) -> Resolver:
    """The common item `"a.b"` / `{key, value}`: a path lookup with the static as default."""
    if not path:
        return lambda value, event, consent: _finish(value if static is UNDEFINED else static,
                                                     static)

    keys = path.split(".")

    def lookup(value: Any, event: Any, consent: Any) -> Any:
        if value is UNDEFINED:
            return UNDEFINED
        found = value
        for key in keys:  # the common case: objects all the way down to a scalar, taken as is
            if found.__class__ is not dict:
                break
            found = found.get(key, UNDEFINED)
        else:
            if found.__class__ in _SIMPLE or (found.__class__ is float and found == found):
                return found
        result = _walk(value, keys, static)
        return result if result.__class__ in _SIMPLE else _finish(result, static)

    return lookup


def _gives_raw_static(mapping: Any) -> bool:
    """Whether a Value can give something other than a valid property or undefined: only an
    item's static `value` given as is when its consent is not granted (walkerOS step 3)."""
    if isinstance(mapping, list):
        return any(_gives_raw_static(entry) for entry in mapping)
    return isinstance(mapping, dict) and truthy(mapping.get("consent", UNDEFINED)) and \
        not is_property(mapping.get("value", UNDEFINED))


def _compile_item(item: Any) -> Resolver:
    """The evaluation order of walkeros.md §2.3 for one mapping item."""
    if isinstance(item, str):
        return _compile_path(item, UNDEFINED)
    if item is None:
        return _malformed
    if not isinstance(item, dict | list) or not item:
        return _undefined  # {}, a number or a bool as a mapping resolves to undefined
    if isinstance(item, list):
        # An array this deep is read as a mapping object in JavaScript: its only mapping key is
        # the inherited `map` (Array.prototype.map), a function with no entries, so it gives {}.
        return _empty_object
    static = item.get("value", UNDEFINED)
    key = item.get("key")
    if set(item) <= {"key", "value"} and isinstance(key, str):
        return _compile_path(key, static)

    condition, fn, validate = item.get("condition"), item.get("fn"), item.get("validate")
    consent_required = item.get("consent", UNDEFINED)
    loop, map_, set_ = (item.get(name, UNDEFINED) for name in ("loop", "map", "set"))
    # What the item holds is known now: each call only does what the item asks for.
    callbacks = bool(condition or fn or validate)
    needs_consent = truthy(consent_required)
    path = key if isinstance(key, str) and key else None
    has_loop, has_map, has_set = truthy(loop), truthy(map_), truthy(set_)
    parts: list[Any] = []
    if has_loop:
        scope, item_mapping = (list(loop) + [UNDEFINED, UNDEFINED])[:2]
        loop_scope = None if scope == "this" else compile_value(scope)
        loop_item = compile_value(item_mapping)
        parts = [item_mapping]
    elif has_map:
        map_items = [(name, compile_value(sub)) for name, sub in map_.items()]
        parts = list(map_.values())
    elif has_set:
        set_items = [_compile_entry(sub) for sub in set_]
        parts = list(set_)
    # A list or object built of Values that each give a valid property (or undefined) is a
    # valid property: step 10 (`_finish`) would return it unchanged, so it is skipped.
    built_is_property = not any(_gives_raw_static(part) for part in parts)

    def resolve(value: Any, event: Any, consent: Any) -> Any:
        context = MappingContext(event, item, consent) if callbacks else None
        if condition and not truthy(_call(condition, "condition", value, context)):
            return UNDEFINED
        if needs_consent and granted_consent(consent_required, consent) is None:
            return static
        result = static if static is not UNDEFINED else value
        if fn:
            result = _call(fn, "fn", value, context)
        if path:
            result = get_by_path(value, path, static)
        built = built_is_property
        if has_loop:
            scoped = [value] if loop_scope is None else loop_scope(value, event, consent)
            if isinstance(scoped, list):
                result = []
                for element in scoped:
                    mapped = loop_item(element, event, consent)
                    if mapped is not UNDEFINED:
                        result.append(mapped)
            else:
                built = False
        elif has_map:
            result = {}
            for name, sub in map_items:
                mapped = sub(value, event, consent)
                if mapped is not UNDEFINED:
                    result[name] = mapped
        elif has_set:
            result = [sub(value, event, consent) for sub in set_items]
        else:
            built = False
        if validate and not truthy(_call(validate, "validate", result, context)):
            return _finish(UNDEFINED, static)
        return result if built else _finish(result, static)

    return resolve


# --------------------------------------------------------------------------------------------
# Rules


def _first_matching(candidate: Any, event: dict[str, Any]) -> dict[str, Any] | None:
    """The first rule (of one or a list) without a condition or whose condition holds."""
    if not truthy(candidate):
        return None
    for rule in candidate if isinstance(candidate, list) else [candidate]:
        if not isinstance(rule, dict):
            continue
        condition = rule.get("condition")
        if not condition or truthy(_call(condition, "rule condition", event,
                                         MappingContext(event, rule, event.get("consent")))):
            return rule
    return None


def find_rule(event: dict[str, Any], rules: Any) -> tuple[dict[str, Any] | None, str]:
    """walkerOS `getMappingEvent`: the rule for the event name, and its key (`'product *'`).

    Quirks kept (§3.1): once `rules[entity]` exists, `* action` is never consulted, and a miss
    (or every condition failing) falls straight to `* *`.
    """
    name = event.get("name")
    parts = name.split(" ") if isinstance(name, str) else []
    entity = parts[0] if parts else ""
    action = parts[1] if len(parts) > 1 else ""
    if not isinstance(rules, dict) or not rules or not entity or not action:
        return None, ""
    entity_key = entity if truthy(rules.get(entity)) else "*"
    entity_rules = rules.get(entity_key)
    rule = None
    action_key = action
    if isinstance(entity_rules, dict):
        action_key = action if truthy(entity_rules.get(action)) else "*"
        rule = _first_matching(entity_rules.get(action_key), event)
    if rule is None:
        entity_key = action_key = "*"
        fallback = rules.get("*")
        rule = _first_matching(fallback.get("*") if isinstance(fallback, dict) else None, event)
    return rule, f"{entity_key} {action_key}" if rule is not None else ""


# --------------------------------------------------------------------------------------------
# Include


def _event_fields(event: dict[str, Any]) -> dict[str, Any]:
    fields = ("entity", "action", "id", "timestamp", "name", "trigger", "timing")
    return {name: event.get(name, UNDEFINED) for name in fields}


_SECTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": lambda event: event.get("data"),
    "globals": lambda event: event.get("globals"),
    "context": lambda event: event.get("context"),
    "user": lambda event: event.get("user"),
    "source": lambda event: event.get("source"),
    "event": _event_fields,
}


def _flatten(prefix: str, value: dict[str, Any], out: dict[str, Any]) -> None:
    for key, item in value.items():
        if item is UNDEFINED:
            continue
        if isinstance(item, dict):
            _flatten(f"{prefix}_{key}", item, out)
        else:
            out[f"{prefix}_{key}"] = item


def flatten_include(event: dict[str, Any], sections: list[str]) -> dict[str, Any]:
    """walkerOS `include`: event sections flattened to `section_key[_subkey…]` properties (§3.5).

    Plain objects recurse, lists stay whole, context tuples become their label (element 0, so
    an empty entry is undefined and left out). The sections are walkerOS 4.4.0's (event model
    v4: no `version` section, no `group` or `count` in `event`).
    """
    out: dict[str, Any] = {}
    chosen = list(_SECTIONS) if "all" in sections else sections
    for section in chosen:
        picker = _SECTIONS.get(section)
        bag = picker(event) if picker else None
        if not isinstance(bag, dict):
            continue
        if section == "context":
            bag = {k: (v[0] if v else UNDEFINED) if isinstance(v, list) else v
                   for k, v in bag.items()}
        _flatten(section, bag, out)
    return out


# --------------------------------------------------------------------------------------------
# Event mapping


@dataclass
class MappedEvent:
    """What `process_event_mapping` hands to the destination (walkerOS `processEventMapping`)."""

    event: dict[str, Any]
    data: Any = UNDEFINED
    rule: CompiledRule | None = None
    mapping_key: str = ""
    ignore: bool = False
    silent: bool = False


def _compile_policy(policy: Any) -> list[tuple[str, Resolver]]:
    if not isinstance(policy, Mapping):
        return []
    return [(path, compile_value(value)) for path, value in policy.items()]


def _apply_policy(event: dict[str, Any], policy: list[tuple[str, Resolver]]) -> dict[str, Any]:
    """Resolve every entry against the event as it was before this layer, then write them all."""
    if not policy:
        return event
    results = [(path, resolve(event, event, None)) for path, resolve in policy]
    for path, result in results:
        event = set_by_path(event, path, result)
    return event


@dataclass
class CompiledRule:
    """A mapping rule with its Values compiled; `settings` holds the destination's rule
    settings compiled too, only those set to something other than `null`: walkerOS reads a rule
    setting as `rule.settings.x ?? settings.x`, so a `null` one falls back like a missing one."""

    rule: dict[str, Any]
    policy: list[tuple[str, Resolver]]
    data: Resolver | None
    settings: dict[str, Resolver]

    @classmethod
    def compile(cls, rule: dict[str, Any]) -> CompiledRule:
        data = rule.get("data", UNDEFINED)
        settings = rule.get("settings")
        return cls(rule, _compile_policy(rule.get("policy")),
                   compile_value(data) if truthy(data) else None,
                   {name: compile_value(value) for name, value in settings.items()
                    if value is not None}
                   if isinstance(settings, dict) else {})


class MappingConfig:
    """A destination config (`mapping`, `data`, `policy`, `include`, …) compiled once."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.policy = _compile_policy(config.get("policy"))
        self.raw_data = config.get("data", UNDEFINED)
        self.data = compile_value(self.raw_data) if truthy(self.raw_data) else None
        self.include = config.get("include")
        self.rules = config.get("mapping")
        self._compiled: dict[int, CompiledRule] = {}
        conditions = False
        for actions in (self.rules or {}).values():
            for candidate in actions.values() if isinstance(actions, dict) else []:
                for rule in candidate if isinstance(candidate, list) else [candidate]:
                    if isinstance(rule, dict):
                        # The raw rules live as long as self.config, so their ids stay unique.
                        self._compiled[id(rule)] = CompiledRule.compile(rule)
                        conditions = conditions or bool(rule.get("condition"))
        # Without rule conditions the rule depends on the event name alone: found once per name.
        self._by_name: dict[str, tuple[CompiledRule | None, str]] | None = \
            None if conditions else {}

    def find(self, event: dict[str, Any]) -> tuple[CompiledRule | None, str]:
        name: Any = event.get("name")
        cache = self._by_name if name.__class__ is str else None
        found = cache.get(name) if cache is not None else None
        if found is None:
            rule, key = find_rule(event, self.rules)
            found = (self._compiled[id(rule)] if rule is not None else None), key
            if cache is not None:
                if len(cache) >= _MAX_NAMES:
                    cache.clear()
                cache[name] = found
        return found


_MAX_NAMES = 1024  # distinct event names kept by MappingConfig.find


def process_event_mapping(event: dict[str, Any], config: MappingConfig) -> MappedEvent:
    """Config policy → rule lookup → rule policy → data → ignore/name → rule data → include →
    remove, exactly in walkerOS's order (walkeros.md §3.3)."""
    event = _apply_policy(event, config.policy)
    compiled, mapping_key = config.find(event)
    rule = compiled.rule if compiled is not None else None
    if compiled is not None:
        event = _apply_policy(event, compiled.policy)

    data = config.data(event, event, None) if config.data else config.raw_data
    silent = bool(rule and truthy(rule.get("silent")))

    if compiled is not None and rule is not None:
        if truthy(rule.get("ignore")):
            return MappedEvent(event, data, compiled, mapping_key, ignore=True, silent=silent)
        name = rule.get("name")
        if truthy(name):
            event = {**event, "name": name}
        if compiled.data is not None:
            resolved = compiled.data(event, event, None)
            data = ({**data, **resolved}
                    if isinstance(data, dict) and isinstance(resolved, dict) else resolved)

    include = rule.get("include") if rule is not None else None
    if include is None:
        include = config.include
    if isinstance(include, list) and include:
        flattened = flatten_include(event, include)
        if flattened:
            if isinstance(data, dict):
                data = {**flattened, **data}
            elif data is UNDEFINED or data is None:
                data = flattened

    remove = rule.get("remove") if rule is not None else None
    if isinstance(remove, list) and isinstance(data, dict):
        for path in remove:
            data = delete_by_path(data, path)
    return MappedEvent(event, data, compiled, mapping_key, ignore=False, silent=silent)
