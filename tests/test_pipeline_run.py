"""`walkeros-klaviyo run` on the bundled example, as the README shows it, and its options."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.cli import main as cli_main
from pipeline.options import (
    OptionsError,
    job_settings,
    parse_duration,
    pin_local_runner,
    take_dry_run_flag,
    unknown_options,
)
from pipeline.simulate import simulate
from transforms.walkeros.config import load_config_file
from transforms.walkeros.jsvalues import canonical_json

EXAMPLES = Path(__file__).parents[1] / "examples"
CONFIG, EVENTS = str(EXAMPLES / "flow.json"), str(EXAMPLES / "events.jsonl")


def _simulated_calls() -> Counter[tuple[Any, str, str]]:
    """(event id, method, body) of every call `simulate` plans for the example.

    Each user of the example logs in twice with the same profile, so which of the two logins
    carries the upsert depends on arrival order; upserts are compared without their event id."""
    config = load_config_file(CONFIG).config
    with open(EVENTS, "rb") as lines:
        records = list(simulate(config, lines))
    return Counter((record["event_id"] if method == "create_event" else None, method,
                    canonical_json(body))
                   for record in records for method, body in record["calls"])


def test_readme_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead_prefix = tmp_path / "out" / "dead_letters"
    code = cli_main(["run", "--input", EVENTS, "--config", CONFIG, "--dry_run",
                     "--dry_run_output", "-", "--dead_letter_path", str(dead_prefix)])
    out, err = capsys.readouterr()
    assert code == 0, err
    calls = [json.loads(line) for line in out.splitlines()]
    got = Counter((c["event_id"] if c["method"] == "create_event" else None, c["method"],
                   canonical_json(c["body"])) for c in calls)
    assert got == _simulated_calls()

    [dead_file] = dead_prefix.parent.glob("dead_letters-*.jsonl")
    letters = [json.loads(line) for line in dead_file.read_text(encoding="utf-8").splitlines()]
    assert sorted(d["stage"] for d in letters) == ["parse", "parse"]
    assert all(d["payload_encoding"] == "utf-8" for d in letters)

    assert _summary_value(err, "events in") == 32
    assert sum(_outcome_rows(err).values()) == 32, "the outcome rows add up to events in"
    assert _outcome_rows(err)["identify only (a profile, no event)"] == 8
    assert _summary_value(err, "calls written (dry run)") == len(calls) == 19
    assert _summary_value(err, "dead letters: parse") == 2
    assert _summary_value(err, "consent not granted") == 1


def _outcome_rows(summary: str) -> dict[str, int]:
    """The rows indented under "events in": where each input record ended."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("events in  "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        label, _, value = line.strip().rpartition(" ")
        rows[label.strip()] = int(value)
    return rows


def _summary_value(summary: str, label: str) -> int:
    [line] = [line for line in summary.splitlines() if line.strip().startswith(label + "  ")]
    return int(line.split()[-1])


def test_files_output(tmp_path: Path) -> None:
    code = cli_main(["run", "--input", EVENTS, "--config", CONFIG,
                     "--dry_run_output", str(tmp_path / "calls"),
                     "--dead_letter_path", str(tmp_path / "dead")])
    assert code == 0
    [calls] = tmp_path.glob("calls-00000-of-*.jsonl")
    assert len(calls.read_text(encoding="utf-8").splitlines()) == 19


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give exactly one input"),
    (["--input", "x", "--input_topic", "projects/p/topics/t"], "give exactly one input"),
    (["--input", "x"], "--config is required"),
    (["--input", "x", "--streaming"], "--input reads files as a batch job"),
    (["--input", "x", "--config", CONFIG], "dead letters need"),
    (["--input", "x", "--config", CONFIG, "--dead_letter_path", "d", "--batch_max_events",
      "5000"], "--batch_max_events must be between 1 and 1000"),
    (["--input", "x", "--config", CONFIG, "--dead_letter_path", "d", "--rate_limits",
      "bulk=1:2"], "--rate_limits: 'bulk=1:2' is not"),
    (["--input", "x", "--config", CONFIG, "--dead_letter_path", "d", "--dry_run",
      "--identify_state_ttl", "soon"], "--identify_state_ttl=soon"),
])
def test_invalid_options_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        job_settings(PipelineOptions(take_dry_run_flag(argv)))


def test_run_reports_errors_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "--input", EVENTS, "--config", "missing.json", "--dry_run",
                     "--dead_letter_path", "d"]) == 2
    assert "configuration error: cannot read config missing.json" in capsys.readouterr().err
    assert cli_main(["run", "--input", EVENTS, "--dead_leter_path", "d"]) == 2
    assert "did you mean --dead_letter_path?" in capsys.readouterr().err


def test_dry_run_flag() -> None:
    assert take_dry_run_flag(["--input", "x", "--dry_run"]) == [
        "--input", "x", "--dry_run_output=-"]
    assert take_dry_run_flag(["--dry_run=true", "--dry_run_output", "p"]) == [
        "--dry_run_output", "p"]
    assert take_dry_run_flag(["--dry_run=false"]) == []
    with pytest.raises(OptionsError, match="contradicts"):
        take_dry_run_flag(["--dry_run=false", "--dry_run_output=p"])
    with pytest.raises(OptionsError):
        take_dry_run_flag(["--dry_run=maybe"])


def test_beam_options_pass_through() -> None:
    assert unknown_options(["--input", "x", "--runner", "DataflowRunner", "--project", "p",
                            "--region", "europe-west1", "--streaming"]) == []
    options = PipelineOptions(["--input_subscription", "projects/p/subscriptions/s",
                               "--config", CONFIG, "--dead_letter_topic", "projects/p/topics/d",
                               "--dry_run_output", "gs://b/calls"])
    settings = job_settings(options)
    assert settings.streaming and settings.source_kind == "subscription"
    assert settings.identify_state_ttl_seconds == 30 * 86_400
    assert pin_local_runner(options, streaming=True) == "BundleBasedDirectRunner"
    assert options.view_as(StandardOptions).streaming
    batch = PipelineOptions(["--runner", "DataflowRunner"])
    assert pin_local_runner(batch, streaming=False) == "DataflowRunner"
    assert pin_local_runner(PipelineOptions([]), streaming=False) == "FnApiRunner"


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2_592_000), ("12h", 43_200),
                                               ("90m", 5_400), ("45s", 45), ("3600", 3600)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_a_job_that_fails_while_sending_reports_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.klaviyo_server import BULK_EVENTS, Fault, KlaviyoTestServer

    with KlaviyoTestServer(time_scale=60.0) as server:
        server.inject(BULK_EVENTS, *[Fault.forbidden()] * 50)  # a key without the scope
        code = cli_main(["run", "--input", EVENTS, "--config", CONFIG,
                         "--dead_letter_path", str(tmp_path / "dead"),
                         "--klaviyo_base_url", server.url, "--klaviyo_api_key", server.api_key,
                         "--rate_limit_scale", "60"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("walkeros-klaviyo run:")]
    assert line.startswith("walkeros-klaviyo run: the job failed: KlaviyoConfigurationError: ")
    assert server.api_key not in err


def test_streaming_on_the_direct_runner_uses_the_stoppable_read() -> None:
    for runner in ("DirectRunner", "SwitchingDirectRunner", None):
        argv = [] if runner is None else ["--runner", runner]
        assert pin_local_runner(PipelineOptions(argv), streaming=True) == "BundleBasedDirectRunner"
    assert pin_local_runner(PipelineOptions(["--runner", "DirectRunner"]),
                            streaming=False) == "DirectRunner"


def test_more_shards_than_the_limits_can_pace_are_refused() -> None:
    with pytest.raises(OptionsError, match="--sink_shards must be at most 10"):
        job_settings(PipelineOptions(["--input", "x.jsonl", "--config", "c.json",
                                      "--dead_letter_path", "d", "--sink_shards", "11"]))
