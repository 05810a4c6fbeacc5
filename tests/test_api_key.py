"""The Klaviyo API key: precedence of its sources, Secret Manager, and never in the job graph."""

from __future__ import annotations

import base64
import bz2
import json
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
from pipeline.options import job_settings
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.walkeros.config import EnvReference, load_config

SECRET = "projects/p/secrets/klaviyo/versions/latest"


class FakeSecretManager:
    """Stands in for SecretManagerServiceClient: returns the stored payload by version name."""

    def access_secret_version(self, name: str) -> Any:
        assert name == SECRET
        return SimpleNamespace(payload=SimpleNamespace(data=b"pk_from_secret\n"))


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


def build_graph(tmp_path: Path, api_key: str | None, runner: str) -> bytes:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"settings": {"apiKey": "$secret.KLAVIYO_SECRET",
                                               "email": "user.email"}}), encoding="utf-8")
    events = tmp_path / "events.jsonl"
    events.write_text('{"name": "a b"}\n', encoding="utf-8")
    argv = ["--input", str(events), "--config", str(config),
            "--dead_letter_path", str(tmp_path / "dead")]
    options = PipelineOptions(argv + (["--klaviyo_api_key", api_key] if api_key else []))
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job_settings(options), load_config(config.read_text()).config, runner)
    return graph_bytes(pipeline)


def test_the_key_is_not_in_the_job_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key referenced by the config (`$secret.` / `$env.`) is read on the worker: neither the
    planning stages nor the sink carry it in the pipeline that is submitted."""
    key = "pk_live_do_not_leak_0123456789"
    monkeypatch.setenv("KLAVIYO_SECRET", key)
    graph = build_graph(tmp_path, None, "DataflowRunner")
    assert key.encode() not in graph
    assert b"KLAVIYO_SECRET" in graph  # only the reference travels


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
