"""Loading a Klaviyo destination config: from a walkerOS `flow.json` (v4) or a bare config.

Errors name the JSON path of the offending field (`flows.default.destinations.klaviyo.config.
mapping.order.complete.data.fn`), so a user can find it. References are resolved as walkerOS
does (walkeros.md §5.2): `$var.` from variables (root < flow < step), `$env.NAME[:default]` from the
environment. `$secret.NAME` and `$env.` in `settings.apiKey` stay references (`EnvReference`), read
where the key is used, so a key never lands in a job graph; `simulate` never needs it.

walkerOS writes callbacks as `"$code:<javascript>"`; that is refused (port.md D7). A Python
callable is named instead with `"$py:package.module:function"` as the value of `fn`,
`condition` or `validate`.

`null` is read as walkerOS 4.4.0 reads it, position by position: as absent wherever walkerOS tests
the field with `??`, `?.` or truthiness (config `settings`, `mapping`, `data`, `policy`,
`include`; a rule, its `settings`, `data`, `policy`, `include`, `remove`, `name`, `ignore`,
`silent`, `consent`, `condition`; the keys of a mapping value; most settings). Where walkerOS
hands the `null` to code that throws on it (a mapping item inside a value, a rule in a rule list,
a `remove` path), the config is refused, naming the path; a null `settings.identify` or rule
`settings.value` is off, as the push's caught error leaves it in walkerOS. A `null` destination
`consent` denies every event, as in walkerOS (with a warning).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

KLAVIYO_PACKAGE = "@walkeros/server-destination-klaviyo"
_CALLBACK_KEYS = frozenset({"fn", "condition", "validate"})
_VALUE_KEYS = frozenset({"key", "value", "map", "loop", "set", "consent"}) | _CALLBACK_KEYS
_SETTINGS = frozenset({"apiKey", "email", "externalId", "phoneNumber", "identify", "currency",
                       "uniqueId"})
_RULE_SETTINGS = frozenset({"identify", "value", "uniqueId"})
_RULE_KEYS = frozenset({"name", "data", "settings", "condition", "consent", "ignore", "silent",
                        "policy", "include", "remove", "batch", "extend"})
_USED_CONFIG_KEYS = frozenset({"settings", "mapping", "data", "policy", "include", "consent"})
# Destination config fields of walkerOS that describe the JS runtime; accepted, not used here.
_RUNTIME_CONFIG_KEYS = frozenset({"id", "init", "queue", "queueMax", "dlqMax", "timeout", "batch",
                                  "breaker", "disabled", "mock", "require", "env", "logger",
                                  "before", "next", "cache", "state", "setup", "credentials",
                                  "loadScript", "primary"})
_INCLUDE_SECTIONS = frozenset({"data", "globals", "context", "user", "source", "event", "all"})
_VAR = re.compile(r"\$var\.([A-Za-z0-9_]+)((?:\.[A-Za-z0-9_\-]+)*)")
_ENV = re.compile(r"\$env\.([A-Za-z_][A-Za-z0-9_]*)(?::([^\"}\s]*))?")
_SECRET = re.compile(r"\$secret\.([A-Z0-9_]+)")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the JSON path."""


@dataclass(frozen=True)
class EnvReference:
    """A value read from the environment where it is used (for the API key)."""

    name: str
    default: str | None = None
    secret: bool = False

    def resolve(self, environ: Mapping[str, str] | None = None) -> str | None:
        environ = os.environ if environ is None else environ
        return environ.get(self.name, self.default)

    def __repr__(self) -> str:
        return f"${'secret' if self.secret else 'env'}.{self.name}"


@dataclass
class LoadedConfig:
    """A validated destination config (plain dicts, as the mapping engine takes them)."""

    config: dict[str, Any]
    destination_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def _path(parent: str, key: str | int) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else key)


# --------------------------------------------------------------------------------------------
# References


@dataclass
class _Resolver:
    variables: dict[str, Any]
    environ: Mapping[str, str]
    resolving: tuple[str, ...] = ()

    def variable(self, name: str, deep: str, where: str) -> Any:
        if name in self.resolving:
            raise ConfigError(f"{where}: variable cycle {' -> '.join(self.resolving + (name,))}")
        if name not in self.variables:
            raise ConfigError(f"{where}: unknown variable $var.{name}")
        inner = _Resolver(self.variables, self.environ, self.resolving + (name,))
        value = inner.value(self.variables[name], where)
        for part in deep.split(".")[1:] if deep else []:
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"{where}: $var.{name}{deep} does not exist")
            value = value[part]
        return value

    def env(self, match: re.Match[str], where: str) -> str:
        name, default = match.group(1), match.group(2)
        value = self.environ.get(name, default)
        if value is None:
            raise ConfigError(f"{where}: environment variable {name} is not set "
                              f"(write $env.{name}:default for a default)")
        return value

    def string(self, text: str, where: str) -> Any:
        if text.startswith("$code:"):
            raise ConfigError(f"{where}: \"$code:\" JavaScript is not supported; name a Python "
                              f"callable with \"$py:module:function\" in fn, condition or validate")
        whole = _VAR.fullmatch(text)
        if whole:
            return self.variable(whole.group(1), whole.group(2), where)
        if _SECRET.fullmatch(text):
            raise ConfigError(f"{where}: $secret references are only supported for "
                              f"settings.apiKey")
        if text.startswith(("$flow.", "$contract.", "$store.")):
            raise ConfigError(f"{where}: {text.split('.')[0]} references are not supported")

        def inline(match: re.Match[str]) -> str:
            value = self.variable(match.group(1), match.group(2), where)
            if isinstance(value, dict | list):
                raise ConfigError(f"{where}: $var.{match.group(1)} inside a string must be a "
                                  f"scalar")
            return value if isinstance(value, str) else json.dumps(value)

        text = _VAR.sub(inline, text)
        return _ENV.sub(lambda match: self.env(match, where), text)

    def value(self, value: Any, where: str) -> Any:
        if isinstance(value, str):
            return self.string(value, where)
        if isinstance(value, dict):
            return {key: self.value(item, _path(where, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item, _path(where, index)) for index, item in enumerate(value)]
        return value


def _api_key_reference(value: Any) -> Any:
    if isinstance(value, str):
        secret = _SECRET.fullmatch(value)
        if secret:
            return EnvReference(secret.group(1), secret=True)
        env = _ENV.fullmatch(value)
        if env:
            return EnvReference(env.group(1), env.group(2))
    return None


# --------------------------------------------------------------------------------------------
# Callables and validation


def import_callable(spec: str, where: str) -> Callable[..., Any]:
    """`"$py:package.module:function"` → the function (D7)."""
    target = spec.removeprefix("$py:")
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{where}: {spec!r} must look like \"$py:package.module:function\"")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{where}: cannot import {target}: {error}") from error
    if not callable(found):
        raise ConfigError(f"{where}: {target} is not callable")
    return found


@dataclass
class _Validator:
    warnings: list[str]

    def callback(self, value: Any, where: str) -> Any:
        if callable(value):
            return value
        if isinstance(value, str) and value.startswith("$py:"):
            return import_callable(value, where)
        raise ConfigError(f"{where}: must be a Python callable or \"$py:module:function\", got "
                          f"{value!r:.80}")

    def value(self, value: Any, where: str) -> Any:
        """A mapping Value (walkeros.md §2.2), with callbacks imported.

        A null item is refused: walkerOS's processMappingValue throws on it (`Object.keys(null)`)
        for every event. A null *key* of a value config is absent: walkerOS destructures the
        keys and tests each for truthiness (`if (key)`, `if (loop)`, …)."""
        if value is None:
            raise ConfigError(f"{where}: null is not a mapping value (walkerOS throws on it for "
                              f"every event, so it never gives a value); remove it")
        if isinstance(value, str) and value.startswith("$py:"):
            raise ConfigError(f"{where}: \"$py:\" callables belong in fn, condition or validate")
        if isinstance(value, list):
            return [self.value(item, _path(where, index)) for index, item in enumerate(value)]
        if not isinstance(value, dict):
            return value  # a path string; or a number/bool, which resolves to undefined
        unknown = sorted(set(value) - _VALUE_KEYS)
        if unknown:
            self.warnings.append(f"{where}: unknown mapping keys {unknown} are ignored")
        checked = dict(value)
        given = {key for key, item in value.items() if item is not None}
        for key in _CALLBACK_KEYS & given:
            checked[key] = self.callback(value[key], _path(where, key))
        if "key" in given and not isinstance(value["key"], str):
            raise ConfigError(f"{where}.key: must be a string path, got {value['key']!r:.80}")
        if "map" in given:
            if not isinstance(value["map"], dict):
                raise ConfigError(f"{where}.map: must be an object")
            checked["map"] = {k: self.value(v, _path(f"{where}.map", k))
                              for k, v in value["map"].items()}
        if "loop" in given:
            loop = value["loop"]
            if not isinstance(loop, list) or len(loop) != 2:
                raise ConfigError(f"{where}.loop: must be [scope, itemMapping]")
            checked["loop"] = [self.value(item, f"{where}.loop[{i}]")
                               for i, item in enumerate(loop)]
        if "set" in given:
            if not isinstance(value["set"], list):
                raise ConfigError(f"{where}.set: must be an array")
            checked["set"] = self.value(value["set"], f"{where}.set")
        if "consent" in given:
            self.consent(value["consent"], f"{where}.consent")
        return checked

    def consent(self, value: Any, where: str) -> None:
        """`{name: bool}`; a null state is false, as getGrantedConsent tests `required[name]`."""
        if not isinstance(value, dict) or not all(v is None or isinstance(v, bool)
                                                  for v in value.values()):
            raise ConfigError(f"{where}: must be an object of booleans like {{\"marketing\": "
                              f"true}}")

    def string_list(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: must be an array of strings")

    def policy(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be an object of path: mapping")
        return {path: self.value(item, _path(where, path)) for path, item in value.items()}

    def include(self, value: Any, where: str) -> None:
        """Section names; a null entry names no section, and walkerOS skips it like an unknown
        name (`SECTIONS[section]` is undefined)."""
        self.string_list([item for item in value if item is not None]
                         if isinstance(value, list) else value, where)
        unknown = sorted({"null" if item is None else item for item in value} - _INCLUDE_SECTIONS)
        if unknown:
            self.warnings.append(f"{where}: unknown include sections {unknown} are ignored")

    def remove(self, value: Any, where: str) -> None:
        """Dotted paths; a null one is refused: walkerOS's deleteByPath splits it and throws, so
        the push fails for every event the rule matches."""
        if isinstance(value, list) and None in value:
            raise ConfigError(f"{where}[{value.index(None)}]: null is not a path (walkerOS "
                              f"fails the push on it); remove it")
        self.string_list(value, where)

    def rule(self, rule: Any, where: str) -> dict[str, Any]:
        """One rule. Every field walkerOS reads with `?.`, `??` or truthiness may be null,
        which is the same as absent (the checks below skip it; the engine reads it so)."""
        if rule is None:
            raise ConfigError(f"{where}: null is not a rule (walkerOS fails the push reading "
                              f"its condition); remove it")
        if not isinstance(rule, dict):
            raise ConfigError(f"{where}: a rule must be an object, got {rule!r:.80}")
        checked = dict(rule)
        given = {key for key, item in rule.items() if item is not None}
        for key in sorted(set(rule) - _RULE_KEYS):
            self.warnings.append(f"{where}.{key}: unknown rule key is ignored")
        if "name" in given and not isinstance(rule["name"], str):
            raise ConfigError(f"{where}.name: must be a string")
        for flag in ("ignore", "silent"):
            if flag in given and not isinstance(rule[flag], bool):
                raise ConfigError(f"{where}.{flag}: must be true or false")
        if "condition" in given:
            checked["condition"] = self.callback(rule["condition"], f"{where}.condition")
        if "data" in given:
            checked["data"] = self.value(rule["data"], f"{where}.data")
        if "policy" in given:
            checked["policy"] = self.policy(rule["policy"], f"{where}.policy")
        if "include" in given:
            self.include(rule["include"], f"{where}.include")
        if "remove" in given:
            self.remove(rule["remove"], f"{where}.remove")
        if "consent" in given:
            self.consent(rule["consent"], f"{where}.consent")
            self.warnings.append(f"{where}.consent: rule consent is not enforced for "
                                 f"destinations by walkerOS (use the config's consent)")
        if "batch" in given:
            self.warnings.append(f"{where}.batch: batching is set by pipeline options here")
        if "settings" in given:
            checked["settings"] = self.rule_settings(rule["settings"], f"{where}.settings")
        return checked

    def rule_settings(self, settings: Any, where: str) -> dict[str, Any]:
        """A null rule setting is absent: `identify` and `uniqueId` are read as
        `rule ?? destination`, and a null `value` resolves to undefined in walkerOS (its
        getMappingValue catches the throw on null), so no value is sent."""
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: must be an object")
        for key in sorted(set(settings) - _RULE_SETTINGS):
            self.warnings.append(f"{where}.{key}: unknown rule setting is ignored")
        return {key: item if key not in _RULE_SETTINGS or item is None
                else self.value(item, f"{where}.{key}") for key, item in settings.items()}

    def rules(self, rules: Any, where: str) -> dict[str, Any]:
        if not isinstance(rules, dict):
            raise ConfigError(f"{where}: must be an object {{entity: {{action: rule}}}}")
        checked: dict[str, Any] = {}
        for entity, actions in rules.items():
            if actions is None:  # getMappingEvent: `if (!mapping[entityKey]) entityKey = '*'`
                checked[entity] = None
                continue
            if not isinstance(actions, dict):
                raise ConfigError(f"{where}.{entity}: must be an object {{action: rule}}")
            checked[entity] = {}
            for action, rule in actions.items():
                rule_where = f"{where}.{entity}.{action}"
                if rule is None:  # `if (!entityMapping[actionKey]) actionKey = '*'`
                    checked[entity][action] = None
                    continue
                checked[entity][action] = (
                    [self.rule(item, f"{rule_where}[{i}]") for i, item in enumerate(rule)]
                    if isinstance(rule, list) else self.rule(rule, rule_where))
        return checked

    def settings(self, settings: Any, where: str) -> dict[str, Any]:
        """Destination settings; null ones take the default (`settings.x ?? default`) or are
        off (`if (settings.x)`); a null `identify` resolves to undefined in walkerOS (its
        getMappingValue catches the throw on null), so it is off too."""
        if settings is None:  # the Klaviyo destination's getConfig: `settings || {}`
            return {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: must be an object")
        checked = dict(settings)
        for key in sorted(set(settings) - _SETTINGS):
            self.warnings.append(f"{where}.{key}: unknown setting is ignored")
        for key in ("email", "externalId", "phoneNumber", "identify", "uniqueId"):
            if settings.get(key) is not None:
                checked[key] = self.value(settings[key], f"{where}.{key}")
        currency = settings.get("currency")
        if currency is not None and not isinstance(currency, str):
            raise ConfigError(f"{where}.currency: must be an ISO 4217 code like \"EUR\"")
        api_key = settings.get("apiKey")
        if api_key is not None and not isinstance(api_key, str | EnvReference):
            raise ConfigError(f"{where}.apiKey: must be a string")
        return checked

    def config(self, config: Any, where: str) -> dict[str, Any]:
        if not isinstance(config, dict):
            raise ConfigError(f"{where or 'config'}: must be an object")
        for key in sorted(set(config) - _USED_CONFIG_KEYS):
            note = "is not used by this pipeline" if key in _RUNTIME_CONFIG_KEYS else \
                "is not a destination config key and is ignored"
            self.warnings.append(f"{_path(where, key)}: {note}")
        checked: dict[str, Any] = {"settings": self.settings(config.get("settings"),
                                                             _path(where, "settings"))}
        # processEventMapping tests each of these for truthiness (`include` with `??`): a null
        # one is left out, which is the same.
        given = {key for key, item in config.items() if item is not None}
        if "mapping" in given:
            checked["mapping"] = self.rules(config["mapping"], _path(where, "mapping"))
        if "data" in given:
            checked["data"] = self.value(config["data"], _path(where, "data"))
        if "policy" in given:
            checked["policy"] = self.policy(config["policy"], _path(where, "policy"))
        if "include" in given:
            self.include(config["include"], _path(where, "include"))
            checked["include"] = config["include"]
        if "consent" in given:
            self.consent(config["consent"], _path(where, "consent"))
            checked["consent"] = config["consent"]
        elif "consent" in config:
            # getGrantedConsent: `hasRequiredConsent = required === undefined`; nothing in a null
            # `required` is true, so walkerOS never delivers an event.
            self.warnings.append(f"{_path(where, 'consent')}: null denies every event (walkerOS "
                                 f"requires no consent only when `consent` is absent)")
            checked["consent"] = None
        return checked


# --------------------------------------------------------------------------------------------
# Entry points


def _find_destination(flows: dict[str, Any], wanted: str | None) -> tuple[str, str, dict[str, Any]]:
    """(flow name, destination id, step) of the Klaviyo destination, by package or by id."""
    found = []
    for flow_name, flow in flows.items():
        destinations = flow.get("destinations") if isinstance(flow, dict) else None
        for step_id, step in (destinations or {}).items():
            package = step.get("package", "") if isinstance(step, dict) else ""
            is_klaviyo = isinstance(package, str) and (
                package == KLAVIYO_PACKAGE or package.startswith(KLAVIYO_PACKAGE + "@"))
            if wanted is None and is_klaviyo or wanted in (step_id, f"{flow_name}.{step_id}"):
                if not isinstance(step, dict):  # the collector destructures it, and throws
                    raise ConfigError(f"flows.{flow_name}.destinations.{step_id}: "
                                      f"{json.dumps(step):.80} is not a destination step object")
                found.append((flow_name, step_id, step))
    if not found:
        what = repr(wanted) if wanted else f"with package {KLAVIYO_PACKAGE}"
        raise ConfigError(f"flows: no destination {what}")
    if len(found) > 1:
        names = ", ".join(f"{flow}.{step}" for flow, step, _ in found)
        raise ConfigError(f"flows: several Klaviyo destinations ({names}); choose one by id")
    return found[0]


def load_config(
    source: dict[str, Any] | str,
    *,
    destination: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Load a flow.json (version 4) or a bare destination config, given as JSON text or a dict.

    `destination` picks a destination by id (`klaviyo` or `flowName.klaviyo`) when a flow has
    several Klaviyo destinations, or one with another package name.
    """
    environ = os.environ if environ is None else environ
    if isinstance(source, str):
        try:
            document = json.loads(source)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config is not valid JSON: line {error.lineno} column "
                              f"{error.colno}: {error.msg}") from error
    else:
        document = source
    if not isinstance(document, dict):
        raise ConfigError("config must be a JSON object")
    validator = _Validator(warnings=[])
    if "flows" not in document and "version" not in document:
        resolver = _Resolver({}, environ)
        raw, where, destination_id = document, "", None
    else:
        if document.get("version") != 4:
            raise ConfigError(f"version: must be 4 (walkerOS flow v4), got "
                              f"{document.get('version')!r}")
        flows = document.get("flows")
        if not isinstance(flows, dict) or not flows:
            raise ConfigError("flows: must be an object with at least one flow")
        flow_name, destination_id, step = _find_destination(flows, destination)
        flow = flows[flow_name]
        variables = {**(document.get("variables") or {}), **(flow.get("variables") or {}),
                     **(step.get("variables") or {})}
        resolver = _Resolver(variables, environ)
        # The collector's registerDestination spreads it (`{...code.config, ...config}`): null
        # gives an empty config.
        raw = {} if step.get("config") is None else step["config"]
        where = f"flows.{flow_name}.destinations.{destination_id}.config"
    settings = raw.get("settings") if isinstance(raw, dict) else None
    api_key = _api_key_reference(settings.get("apiKey")) if isinstance(settings, dict) else None
    if api_key is not None and isinstance(settings, dict):
        raw = {**raw, "settings": {k: v for k, v in settings.items() if k != "apiKey"}}
    resolved = resolver.value(raw, where)
    if api_key is not None:
        resolved["settings"]["apiKey"] = api_key
    return LoadedConfig(validator.config(resolved, where), destination_id, validator.warnings)


def load_config_file(path: str, **options: Any) -> LoadedConfig:
    """Read and load a config file from a local path."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from error
    return load_config(text, **options)
