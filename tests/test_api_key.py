"""The Klaviyo API key: precedence of its sources, Secret Manager, never in the job graph, and
the one check at launch (good, missing, malformed, refused) locally and from the Flex Template
launcher."""

from __future__ import annotations

import base64
import bz2
import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2

from pipeline.assembly import build
from pipeline.cli import main
from pipeline.options import job_settings
from tests.klaviyo_server import GET_PROFILES, Fault, KlaviyoTestServer
from transforms.klaviyo.api_key import ApiKeySource, check_api_key
from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.walkeros.config import EnvReference, load_config

pytest_plugins = ["tests.conftest_klaviyo"]
SECRET = "projects/p/secrets/klaviyo/versions/latest"
ROOT = Path(__file__).parents[1]


class FakeSecretManager:
    """Stands in for SecretManagerServiceClient: returns the stored payload by version name."""

    payload = b"pk_from_secret\n"

    def access_secret_version(self, name: str) -> Any:
        assert name == SECRET
        return SimpleNamespace(payload=SimpleNamespace(data=self.payload))


def test_precedence_secret_then_environment_then_option_then_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("google.cloud.secretmanager.SecretManagerServiceClient",
                        FakeSecretManager)
    reference = EnvReference("MY_KEY", secret=True)
    everything = ApiKeySource(SECRET, "pk_option", reference)
    environ = {"KLAVIYO_API_KEY": "pk_env", "MY_KEY": "pk_config"}
    assert everything.resolve(environ) == "pk_from_secret"
    assert ApiKeySource(None, "pk_option", reference).resolve(environ) == "pk_env"
    assert ApiKeySource(None, "pk_option", reference).resolve({"MY_KEY": "x"}) == "pk_option"
    assert ApiKeySource(None, None, reference).resolve({"MY_KEY": "pk_config"}) == "pk_config"


def test_a_missing_key_is_a_configuration_error() -> None:
    with pytest.raises(KlaviyoConfigurationError, match="no Klaviyo API key"):
        ApiKeySource(None, None, EnvReference("MY_KEY", secret=True)).resolve({})


def graph_bytes(pipeline: beam.Pipeline) -> bytes:
    """The submitted pipeline proto with every pickled DoFn decoded (Beam stores them
    base64 + bz2/zlib compressed, where a plain byte search would find nothing)."""
    proto = pipeline.to_runner_api()
    found = [proto.SerializeToString()]
    for transform in proto.components.transforms.values():
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        pickled = base64.b64decode(
            beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn.payload)
        found.append(bz2.decompress(pickled) if pickled[:3] == b"BZh" else zlib.decompress(pickled))
    return b"".join(found)


def build_graph(tmp_path: Path, api_key: str | None, runner: str, *extra: str) -> bytes:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"settings": {"apiKey": "$secret.KLAVIYO_SECRET",
                                               "email": "user.email"}}), encoding="utf-8")
    events = tmp_path / "events.jsonl"
    events.write_text('{"name": "a b"}\n', encoding="utf-8")
    argv = ["--input", str(events), "--config", str(config),
            "--dead_letter_path", str(tmp_path / "dead")]
    options = PipelineOptions(argv + (["--klaviyo_api_key", api_key] if api_key else [])
                              + list(extra))
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job_settings(options), load_config(config.read_text()).config, runner)
    return graph_bytes(pipeline)


def test_the_key_is_not_in_the_job_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key is read where it is used: neither the planning stages nor the sink carry it (nor
    one the config references) in the pipeline that is submitted."""
    key = "pk_live_do_not_leak_0123456789"
    monkeypatch.setenv("KLAVIYO_SECRET", key)
    graph = build_graph(tmp_path, None, "DataflowRunner", "--klaviyo_api_key_secret", SECRET)
    assert key.encode() not in graph
    assert SECRET.encode() in graph  # only the references travel
    assert b"KLAVIYO_SECRET" in graph


def test_the_graph_check_finds_a_literal_key(tmp_path: Path) -> None:
    """The check above can fail: a key given as an option is in the graph of a local run (and
    is why such a key is refused on Dataflow)."""
    assert b"pk_literal_0123456789" in build_graph(tmp_path, "pk_literal_0123456789",
                                                   "FnApiRunner")


def test_a_run_without_any_key_source_stops_at_launch(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    monkeypatch.delenv("KLAVIYO_API_KEY", raising=False)
    events = tmp_path / "events.jsonl"
    events.write_text('{"name": "a b"}\n', encoding="utf-8")
    config = tmp_path / "config.json"
    config.write_text("{}", encoding="utf-8")
    assert main(["run", "--input", str(events), "--config", str(config),
                 "--dead_letter_path", str(tmp_path / "dead")]) == 2
    assert "no Klaviyo API key" in capsys.readouterr().err


@pytest.mark.parametrize("source", [
    ApiKeySource(None, "pk_literal_0123456789", None),
    ApiKeySource(None, None, EnvReference("KLAVIYO_SECRET", secret=True)),
    ApiKeySource(None, None, None),  # KLAVIYO_API_KEY of the workers
])
def test_on_dataflow_only_the_secret_manager_key_is_accepted(source: ApiKeySource) -> None:
    assert "--klaviyo_api_key_secret" in (source.dataflow_problem("DataflowRunner") or "")
    assert source.dataflow_problem("FnApiRunner") is None
    assert ApiKeySource(SECRET, None, None).dataflow_problem("DataflowRunner") is None


# --- the key check at launch -------------------------------------------------------------------


def launch(tmp_path: Path, *extra: str, events: str = '{"name": "page view"}\n') -> list[str]:
    """The `run` command line of a small job, its input written unless `events` is empty."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"settings": {"email": "user.email"}}), encoding="utf-8")
    source = tmp_path / "events.jsonl"
    if events:
        source.write_text(events, encoding="utf-8")
    return ["--input", str(source), "--config", str(config),
            "--dead_letter_path", str(tmp_path / "dead"), *extra]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_good_key_is_checked_with_one_request(klaviyo_server: KlaviyoTestServer) -> None:
    source = ApiKeySource(None, klaviyo_server.api_key, None)

    assert check_api_key(source, base_url=klaviyo_server.url, environ={}) is None
    assert klaviyo_server.statuses(GET_PROFILES) == [200]


@pytest.mark.parametrize("key", ["not a key", "pk_", "AbC123", " pk_0123456789abcdef"])
def test_a_malformed_key_stops_the_launch_before_any_request(
        key: str, klaviyo_server: KlaviyoTestServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KLAVIYO_API_KEY", key)

    assert main(["run", *launch(tmp_path, "--klaviyo_base_url", klaviyo_server.url)]) == 2
    assert "malformed" in one_line(capsys.readouterr().err)
    assert klaviyo_server.log == []


@pytest.mark.parametrize("fault", [None, Fault.forbidden()], ids=["401", "403"])
def test_a_refused_key_stops_the_launch_before_the_input_is_read(
        fault: Fault | None, klaviyo_server: KlaviyoTestServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The input does not even exist: had the job been built, reading it would fail first."""
    key = klaviyo_server.api_key if fault else "pk_revoked_0123456789abcdef"
    if fault:
        klaviyo_server.inject(GET_PROFILES, fault)
    monkeypatch.setenv("KLAVIYO_API_KEY", key)
    argv = launch(tmp_path, "--klaviyo_base_url", klaviyo_server.url, events="")

    assert main(["run", *argv]) == 2
    line = one_line(capsys.readouterr().err)
    assert "Klaviyo refused the API key" in line
    assert key not in line
    assert klaviyo_server.statuses(GET_PROFILES) == [int(fault.status) if fault else 401]


def test_a_dry_run_checks_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 klaviyo_server: KlaviyoTestServer) -> None:
    monkeypatch.setenv("KLAVIYO_API_KEY", "pk_revoked_0123456789abcdef")
    argv = launch(tmp_path, "--klaviyo_base_url", klaviyo_server.url,
                  "--dry_run_output", str(tmp_path / "planned"))

    assert main(["run", *argv]) == 0
    assert klaviyo_server.log == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_klaviyo_is_a_warning_not_a_refusal() -> None:
    source = ApiKeySource(None, "pk_0123456789abcdef", None)

    warning = check_api_key(source, base_url=f"http://127.0.0.1:{free_port()}", environ={})

    assert warning is not None and warning.startswith("could not check the Klaviyo API key")


def test_the_flex_template_launcher_stops_on_a_refused_key(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path) -> None:
    """templates/main.py as the launcher runs it, in its own process: one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KLAVIYO_API_KEY": "pk_revoked_0123456789ab",
           "WALKEROS_KLAVIYO_IMAGE": "europe-docker.pkg.dev/p/r/walkeros-klaviyo:test"}
    argv = launch(tmp_path, "--klaviyo_base_url", klaviyo_server.url)

    done = subprocess.run([sys.executable, str(ROOT / "templates" / "main.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert "Klaviyo refused the API key (HTTP 401" in one_line(done.stderr)


def test_on_dataflow_the_launcher_checks_the_secret_manager_key(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The launcher reads the key from Secret Manager, as the workers will, and stops before
    anything is submitted; a key from anywhere else is refused outright."""
    monkeypatch.setattr("google.cloud.secretmanager.SecretManagerServiceClient",
                        FakeSecretManager)
    monkeypatch.setattr(FakeSecretManager, "payload", b"pk_revoked_0123456789abcdef\n")
    dataflow = ["--runner", "DataflowRunner", "--project", "p", "--region", "europe-west1",
                "--temp_location", "gs://b/tmp", "--klaviyo_base_url", klaviyo_server.url]

    assert main(["run", *launch(tmp_path, *dataflow, "--klaviyo_api_key_secret", SECRET)]) == 2
    assert "Klaviyo refused the API key" in one_line(capsys.readouterr().err)
    monkeypatch.setenv("KLAVIYO_API_KEY", klaviyo_server.api_key)
    assert main(["run", *launch(tmp_path, *dataflow)]) == 2
    assert "--klaviyo_api_key_secret" in one_line(capsys.readouterr().err)
    assert klaviyo_server.statuses(GET_PROFILES) == [401]
