"""Config loading: flow.json v4 or a bare config, references, callables, clear errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from transforms.walkeros.config import ConfigError, EnvReference, load_config, load_config_file
from transforms.walkeros.mapping import MappingContext


def double(value: Any, context: MappingContext) -> Any:
    """Used by the `$py:` tests below."""
    return value["data"]["total"] * 2


def flow(destination_config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"version": 4, "variables": {"currency": "EUR", "nested": {"a": [1, 2]}},
            "flows": {"web": {"config": {"platform": "server"}, "destinations": {
                "k": {"package": "@walkeros/server-destination-klaviyo@4.4.0",
                      "config": destination_config, **extra}}}}}


def test_bare_config_loads_as_is() -> None:
    loaded = load_config({"settings": {"currency": "EUR"}, "mapping": {"a": {"b": {"name": "X"}}}})
    assert loaded.config["mapping"]["a"]["b"]["name"] == "X" and loaded.destination_id is None


def test_flow_finds_the_klaviyo_destination_and_resolves_references() -> None:
    document = flow({"settings": {"apiKey": "$secret.KLAVIYO_KEY", "currency": "$var.currency",
                                  "email": "$env.EMAIL_PATH:user.email"},
                     "mapping": {"o": {"c": {"data": {"map": {
                         "n": {"value": "$var.nested"}, "t": "order $var.currency"}}}}}})
    loaded = load_config(json.dumps(document), environ={})
    settings = loaded.config["settings"]
    assert loaded.destination_id == "k"
    assert settings["apiKey"] == EnvReference("KLAVIYO_KEY", secret=True)
    assert settings["currency"] == "EUR" and settings["email"] == "user.email"
    data_map = loaded.config["mapping"]["o"]["c"]["data"]["map"]
    assert data_map["n"] == {"value": {"a": [1, 2]}} and data_map["t"] == "order EUR"


def test_api_key_reference_never_shows_the_key() -> None:
    reference = EnvReference("KLAVIYO_KEY", secret=True)
    assert reference.resolve({"KLAVIYO_KEY": "pk_secret"}) == "pk_secret"
    assert "pk_secret" not in repr(reference)


def test_step_variables_override_flow_and_root() -> None:
    document = flow({"settings": {"currency": "$var.currency"}}, variables={"currency": "USD"})
    assert load_config(document).config["settings"]["currency"] == "USD"


@pytest.mark.parametrize(("settings", "message"), [
    ({"currency": "$var.missing"}, "unknown variable $var.missing"),
    ({"email": "$env.NOPE"}, "environment variable NOPE is not set"),
    ({"email": "$flow.other.url"}, "$flow references are not supported"),
])
def test_reference_errors_name_the_path(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(flow({"settings": settings}), environ={})
    assert message in str(error.value)
    assert "flows.web.destinations.k.config.settings" in str(error.value)


def test_variable_cycles_are_errors() -> None:
    document = flow({"settings": {"currency": "$var.a"}})
    document["variables"] = {"a": "$var.b", "b": "$var.a"}
    with pytest.raises(ConfigError, match="cycle"):
        load_config(document)


def test_code_strings_are_refused_with_their_path() -> None:
    document = flow({"mapping": {"order": {"complete": {"data": {"fn": "$code:(e) => e.data"}}}}})
    with pytest.raises(ConfigError) as error:
        load_config(document)
    assert "flows.web.destinations.k.config.mapping.order.complete.data.fn" in str(error.value)
    assert "$py:" in str(error.value)


def test_python_callables_by_import_path() -> None:
    config = load_config({"data": {"fn": "$py:tests.test_config:double"}}).config
    assert config["data"]["fn"] is double
    with pytest.raises(ConfigError, match="cannot import"):
        load_config({"data": {"fn": "$py:tests.test_config:missing"}})
    with pytest.raises(ConfigError, match="belong in fn"):
        load_config({"data": "$py:tests.test_config:double"})


@pytest.mark.parametrize(("config", "message"), [
    ({"mapping": {"a": {"b": {"ignore": "yes"}}}}, "mapping.a.b.ignore: must be true or false"),
    ({"mapping": {"a": {"b": {"name": 5}}}}, "mapping.a.b.name: must be a string"),
    ({"mapping": {"a": {"b": 5}}}, "mapping.a.b: a rule must be an object"),
    ({"mapping": {"a": {"b": {"data": {"loop": ["nested"]}}}}}, "loop: must be [scope"),
    ({"data": {"map": {"x": None}}}, "data.map.x: null is not a mapping value"),
    ({"consent": {"marketing": "yes"}}, "consent: must be an object of booleans"),
    ({"settings": {"currency": 5}}, "settings.currency"),
    ({"include": "data"}, "include: must be an array of strings"),
])
def test_wrong_types_are_clear_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(config)


def test_unknown_keys_warn() -> None:
    loaded = load_config({"settings": {"emial": "user.email"}, "timeout": 5,
                          "mapping": {"a": {"b": {"skip": True}}}})
    assert any("settings.emial: unknown setting" in w for w in loaded.warnings)
    assert any("timeout: is not used" in w for w in loaded.warnings)
    assert any("mapping.a.b.skip: unknown rule key" in w for w in loaded.warnings)


def test_flow_errors() -> None:
    with pytest.raises(ConfigError, match="version: must be 4"):
        load_config({"version": 3, "flows": {}})
    with pytest.raises(ConfigError, match="no destination with package"):
        load_config({"version": 4, "flows": {"a": {"destinations": {}}}})
    two = flow({})
    two["flows"]["web"]["destinations"]["k2"] = two["flows"]["web"]["destinations"]["k"]
    with pytest.raises(ConfigError, match="several Klaviyo destinations"):
        load_config(two)
    assert load_config(two, destination="k2").destination_id == "k2"
    assert load_config(two, destination="web.k").destination_id == "k"


def test_file_errors(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config_file(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON: line 1"):
        load_config_file(str(broken))
