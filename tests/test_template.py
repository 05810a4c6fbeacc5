"""The Flex Template's metadata.json matches the pipeline's options (issue: deployable by a new
user): every parameter is an option, every user-facing option is a parameter, regexes compile
and accept the documented examples, and what is required matches the options' own checks."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud import dataflow_v1beta3
from google.protobuf import json_format

from pipeline.options import KlaviyoOptions, OptionsError, job_settings

TEMPLATES = Path(__file__).parents[1] / "templates"
METADATA = json.loads((TEMPLATES / "metadata.json").read_text(encoding="utf-8"))
PARAMETERS = {parameter["name"]: parameter for parameter in METADATA["parameters"]}
# Options that are deliberately not template parameters, and why.
NOT_IN_TEMPLATE = {
    "klaviyo_api_key": "a literal key would be stored in the job graph; the secret is used",
    "input": "file input makes a batch job; backfills run with `walkeros-klaviyo run`",
}


def option_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    KlaviyoOptions._add_argparse_args(parser)
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def test_metadata_is_a_valid_template_metadata_message() -> None:
    message = dataflow_v1beta3.TemplateMetadata.pb()()
    json_format.Parse(json.dumps(METADATA), message)  # strict: unknown fields fail
    assert message.name and all(p.label and p.help_text for p in message.parameters)
    assert len(PARAMETERS) == len(METADATA["parameters"]), "duplicate parameter names"


def test_parameters_and_options_correspond() -> None:
    options = option_actions()
    assert set(PARAMETERS) <= set(options), "every parameter must be a pipeline option"
    assert set(options) - set(PARAMETERS) == set(NOT_IN_TEMPLATE)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_regexes_accept_the_documented_example(name: str) -> None:
    parameter = PARAMETERS[name]
    example = re.search(r"Example: (\S+)$", parameter["helpText"])
    assert example, f"{name}: helpText should end with an example"
    for regex in parameter.get("regexes", []):
        assert re.search(regex, example.group(1)), f"{name}: {regex} refuses its example"


@pytest.mark.parametrize(("name", "wrong"), [
    ("input_subscription", "projects/p/topics/t"), ("config", "/local/flow.json"),
    ("klaviyo_api_key_secret", "pk_live_123"), ("batch_max_events", "1001"),
    ("identify_state_ttl", "soon"), ("rate_limits", "bulk=1:2"),
])
def test_regexes_refuse_wrong_values(name: str, wrong: str) -> None:
    assert not any(re.search(regex, wrong) for regex in PARAMETERS[name]["regexes"])


def test_documented_defaults_are_the_options_defaults() -> None:
    options = option_actions()
    for name, parameter in PARAMETERS.items():
        documented = re.search(r"Default ([0-9a-z.]+)\.", parameter["helpText"])
        if documented:
            assert str(options[name].default) in (documented.group(1),
                                                 f"{documented.group(1)}.0"), name


def base_args(**values: str) -> list[str]:
    return [f"--{name}={value}" for name, value in values.items()]


def test_required_parameters_match_the_options_validation() -> None:
    required = {name for name, parameter in PARAMETERS.items() if not parameter["isOptional"]}
    assert required == {"config"}
    minimal: dict[str, Any] = {"config": "gs://b/flow.json",
                               "input_subscription": "projects/p/subscriptions/s",
                               "dead_letter_topic": "projects/p/topics/d"}
    assert job_settings(PipelineOptions(base_args(**minimal))).source_kind == "subscription"
    with pytest.raises(OptionsError, match="--config is required"):
        job_settings(PipelineOptions(base_args(**(minimal | {"config": ""}))))


def test_the_image_runs_the_template_entry_point() -> None:
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8")
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/main.py" in dockerfile
    assert "COPY templates/main.py main.py" in dockerfile
    source = (TEMPLATES / "main.py").read_text(encoding="utf-8")
    compile(source, "main.py", "exec")
    assert "from pipeline.run_job import main" in source
