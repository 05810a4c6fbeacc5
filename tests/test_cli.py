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
