"""The Flex Template's metadata.json matches the pipeline's options (issue: deployable by a new
user): every parameter is an option, every user-facing option is a parameter, regexes compile
and accept the documented examples, and what is required matches the options' own checks."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.cloud import dataflow_v1beta3
from google.protobuf import json_format
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline.options import KlaviyoOptions, OptionsError, job_settings

ROOT = Path(__file__).parents[1]
TEMPLATES = ROOT / "templates"
METADATA = json.loads((TEMPLATES / "metadata.json").read_text(encoding="utf-8"))
PARAMETERS = {parameter["name"]: parameter for parameter in METADATA["parameters"]}
# Options that are deliberately not template parameters, and why.
NOT_IN_TEMPLATE = {
    "klaviyo_api_key": "a literal key would be stored in the job graph; the secret is used",
    "input": "file input makes a batch job; backfills run with `walkeros-klaviyo run`",
    "local_partitions": "splits local FnApiRunner runs over files only; Dataflow is not split",
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


def _template_main() -> Any:
    spec = importlib.util.spec_from_file_location("template_main", TEMPLATES / "main.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only definitions: the launch is under __main__
    return module


def test_workers_get_the_templates_image_or_the_launch_is_refused() -> None:
    main = _template_main()
    own = {main.IMAGE_ENV: "europe-west1-docker.pkg.dev/p/dataflow/walkeros-klaviyo:abc"}
    assert main.with_worker_image(["--config=gs://b/f.json"], own) == [
        "--config=gs://b/f.json", f"--sdk_container_image={own[main.IMAGE_ENV]}"]
    given = ["--sdk_container_image=other:1", "--config=gs://b/f.json"]
    assert main.with_worker_image(given, own) == given
    assert main.with_worker_image(["--sdk_container_image", "other:1"], {}) == [
        "--sdk_container_image", "other:1"]
    with pytest.raises(main.MissingImage, match="workers would start without the package"):
        main.with_worker_image(["--config=gs://b/f.json"], {main.IMAGE_ENV: " "})


def _dockerfile_args() -> dict[str, str]:
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8")
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))


def test_the_image_is_pinned_and_its_python_version_is_set_once() -> None:
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8")
    args = _dockerfile_args()
    assert re.fullmatch(r"[0-9]{8}_RC[0-9]{2}", args["LAUNCHER_TAG"]), "a dated launcher tag"
    froms = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert froms == [
        "gcr.io/dataflow-templates-base/python3${PYTHON_MINOR}-template-launcher-base:"
        "${LAUNCHER_TAG}", "apache/beam_python3.${PYTHON_MINOR}_sdk:${BEAM_VERSION}"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    python = Version(f"3.{args['PYTHON_MINOR']}")
    assert python in SpecifierSet(pyproject["project"]["requires-python"])
    [beam] = [Requirement(dep) for dep in pyproject["project"]["dependencies"]
              if dep.startswith("apache-beam")]
    assert Version(args["BEAM_VERSION"]) in beam.specifier


def test_installs_are_constrained_by_the_beam_images_own_packages() -> None:
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8")
    run = " ".join(dockerfile.split("\nRUN ", 1)[1].split("\n\n", 1)[0].split())
    freeze = "pip list --format=freeze > /template/beam-constraints.txt"
    install = "pip install --no-cache-dir --constraint /template/beam-constraints.txt ."
    assert freeze in run and install in run and run.endswith("&& pip check")
    assert run.index(freeze) < run.index(install)


def test_the_image_knows_its_own_name() -> None:
    dockerfile = (TEMPLATES / "Dockerfile").read_text(encoding="utf-8")
    main = _template_main()
    assert f"ENV {main.IMAGE_ENV}=${{IMAGE}}" in dockerfile
    assert 'test -n "${IMAGE}"' in dockerfile  # an image without its name is not built
    build = (TEMPLATES / "cloudbuild.yaml").read_text(encoding="utf-8")
    assert '"--build-arg", "IMAGE=${_IMAGE}"' in build and '"-t", "${_IMAGE}"' in build


def make(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "-s", "-n", "-C", str(TEMPLATES), *args],
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("target", "given", "missing"), [
    ("setup", ["PROJECT=p", "REGION=r"], "BUCKET"),
    ("image", ["REGION=r"], "PROJECT"),
    ("template", ["PROJECT=p", "REGION=r"], "BUCKET"),
    ("secret", [], "PROJECT"),
    ("config", ["BUCKET=b"], "FLOW"),
    ("run", ["PROJECT=p", "BUCKET=b"], "REGION"),
    ("update", ["PROJECT=p", "REGION=r"], "BUCKET"),
    ("drain", ["PROJECT=p", "REGION=r"], "JOB_ID"),
    ("replay", [], "PROJECT"),
])
def test_make_targets_refuse_missing_variables(target: str, given: list[str],
                                               missing: str) -> None:
    result = make(target, *given)
    assert result.returncode != 0 and not result.stdout
    assert f"{missing} is not set: make -C templates {target} {missing}=" in result.stderr


def test_make_config_uploads_the_users_flow() -> None:
    result = make("config", "BUCKET=b", "FLOW=examples/flow.json")
    assert result.stdout.split() == ["gcloud", "storage", "cp",
                                     str(ROOT / "examples" / "flow.json"),
                                     "gs://b/walkeros/flow.json"]
    assert "no such file" in make("config", "BUCKET=b", "FLOW=missing.json").stderr


def test_make_setup_prepares_an_empty_project() -> None:
    commands = " ".join(make("setup", "PROJECT=p", "REGION=r", "BUCKET=b").stdout.split())
    for api in ("dataflow", "compute", "pubsub", "artifactregistry", "cloudbuild",
                "secretmanager", "storage"):
        assert f"{api}.googleapis.com" in commands
    assert "gcloud pubsub subscriptions create walkeros-dead-letters" in commands
    for role in ("dataflow.worker", "artifactregistry.reader", "storage.objectAdmin",
                 "pubsub.subscriber", "pubsub.publisher"):
        assert f"--role roles/{role}" in commands
