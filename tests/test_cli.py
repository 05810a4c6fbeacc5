"""The `walkeros-klaviyo` command line: simulate's output contract (port.md §3) and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.bench import EXAMPLES
from pipeline.cli import main
from tests.conformance import CONFORMANCE_DIR, calls_equal


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_simulate_writes_one_record_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "simulate", "--config", str(EXAMPLES / "flow.json"),
                         "--input", str(EXAMPLES / "events.jsonl"))
    records = [json.loads(line) for line in lines]
    events = (EXAMPLES / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert code == 0 and len(records) == len(events)
    assert all(set(record) == {"event_id", "calls", "skipped", "problems"} for record in records)
    skipped = {record["skipped"] for record in records}
    assert skipped == {None, "ignored", "consent", "no_identifier", "invalid_event"}
    methods = [call[0] for record in records for call in record["calls"]]
    assert {"create_event", "create_or_update_profile"} == set(methods)


def test_simulate_bare_config_from_stdin(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    case = json.loads((CONFORMANCE_DIR / "steps.cases.jsonl").read_text().splitlines()[2])
    expected = json.loads((CONFORMANCE_DIR / "steps.expected.jsonl").read_text().splitlines()[2])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(case["config"]), encoding="utf-8")
    import io
    stdin = "\n".join(map(json.dumps, case["events"])).encode("utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code, lines, _ = run(capsys, "simulate", "--config", str(config), "--input", "-")
    assert code == 0
    assert calls_equal(json.loads(lines[0])["calls"], expected["events"][0]["calls"])


def test_configuration_errors_are_one_clear_line(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    config = tmp_path / "flow.json"
    config.write_text(json.dumps({"data": {"fn": "$code:(e) => e"}}), encoding="utf-8")
    code, _, err = run(capsys, "simulate", "--config", str(config), "--input", "-")
    assert code == 2 and err.startswith("walkeros-klaviyo: configuration error: data.fn:")


EXAMPLE_RUN = ["run", "--input", str(EXAMPLES / "events.jsonl"), "--config",
               str(EXAMPLES / "flow.json"), "--dead_letter_path", "unused/dead"]


@pytest.mark.parametrize(("extra", "message"), [
    (["-dry_run"], "unknown option -dry_run (did you mean --dry_run?)"),
    (["--dry_run", "stray"], "unexpected argument 'stray'"),
    (["--dry_run", "--batch_max_events=abc"],
     "argument --batch_max_events: invalid int value: 'abc'"),
    (["--dry_run", "--max_retry_seconds", "soon"],
     "argument --max_retry_seconds: invalid float value: 'soon'"),
])
def test_run_refuses_what_it_does_not_understand_in_one_line(
        capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code, out, err = run(capsys, *EXAMPLE_RUN, *extra)
    assert code == 2 and not out  # nothing planned, nothing sent
    assert err == f"walkeros-klaviyo run: {message}\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import apache_beam

    from pipeline import __version__
    expected = f"walkeros-klaviyo {__version__} (apache-beam {apache_beam.__version__})"
    assert run(capsys, "run", "--version")[:2] == (0, [expected])
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == expected
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'version = { attr = "pipeline.__version__" }' in pyproject


def test_run_help_marks_the_required_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "run", "--help")
    text = " ".join(" ".join(lines).split())
    assert code == 0
    for option, mark in [("--config CONFIG", "[required]"),
                         ("--input INPUT", "[required: one input]"),
                         ("--input_subscription INPUT_SUBSCRIPTION", "[required: one input]"),
                         ("--dead_letter_path DEAD_LETTER_PATH", "[required: one or both]")]:
        assert f"{option} {mark}" in text, option
    assert "--destination DESTINATION [required" not in text


def test_the_readme_simulate_example_is_current(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## simulate:", 1)[1]
    shown = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    third = (EXAMPLES / "events.jsonl").read_text(encoding="utf-8").splitlines()[2]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO((third + "\n").encode("utf-8"))))
    code, lines, _ = run(capsys, "simulate", "--config", str(EXAMPLES / "flow.json"),
                         "--input", "-")
    assert code == 0 and [json.loads(line) for line in lines] == [shown]
