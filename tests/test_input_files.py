"""Files are read as bytes, cut into lines by one rule for `run` and `simulate`
(transforms/lines.py): bad bytes are dead letters, blank lines are skipped and counted."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main as cli_main
from pipeline.simulate import simulate, write_simulation
from transforms.lines import is_blank, split_lines
from transforms.walkeros.config import load_config_file

EXAMPLES = Path(__file__).parents[1] / "examples"
CONFIG = str(EXAMPLES / "flow.json")


def _event(event_id: str, **fields: Any) -> bytes:
    event = {"name": "product view", "id": event_id, "data": {"id": "sku-1"},
             "user": {"id": "u-1"}, "consent": {"marketing": True}, **fields}
    return json.dumps(event).encode("utf-8")


# One line each, with what the pipeline and simulate make of it.
TRICKY = [
    (b"\xef\xbb\xbf" + _event("bom"), "event"),  # a BOM at the start of the file is dropped
    (_event("crlf") + b"\r", "event"),  # the \r of \r\n
    (b"", "blank"),
    (b"  \t\r", "blank"),
    (b"\xff\xfe" + _event("latin"), "dead"),  # not UTF-8
    (b'{"name": "\xed\xa0\x80 x"}', "dead"),  # an encoded lone surrogate is not UTF-8 either
    (_event("surrogate", data={"id": "\\ud800"}).replace(b"\\\\ud800", b"\\ud800"), "event"),
    (_event("bare-cr-a") + b"\r" + _event("bare-cr-b"), "dead"),  # a bare \r splits nothing
    (_event("last"), "event"),  # no \n at the end of the file
]
FILE = b"\n".join(line for line, _ in TRICKY)


def test_split_lines() -> None:
    lines = list(split_lines(io.BytesIO(FILE)))
    assert lines == [line.removeprefix(b"\xef\xbb\xbf").removesuffix(b"\r")
                     for line, _ in TRICKY]
    assert [is_blank(line) for line in lines] == [kind == "blank" for _, kind in TRICKY]
    assert list(split_lines(io.BytesIO(b"a\r\nb\n\n"))) == [b"a", b"b", b""]
    assert list(split_lines(io.BytesIO(b"x\xef\xbb\xbf\n\xef\xbb\xbfy"))) == [
        b"x\xef\xbb\xbf", b"\xef\xbb\xbfy"]  # a BOM is content except at the very start


def test_simulate_reads_bytes_like_the_pipeline() -> None:
    config = load_config_file(CONFIG).config
    records = list(simulate(config, io.BytesIO(FILE)))
    expected = [kind for _, kind in TRICKY if kind != "blank"]
    assert len(records) == len(expected)
    for record, kind in zip(records, expected, strict=True):
        assert (record["skipped"] == "invalid_event") is (kind == "dead"), record
    assert records[2]["problems"][0].startswith("not UTF-8")

    out = io.StringIO()
    write_simulation(config, io.BytesIO(FILE), out)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(expected)
    out.getvalue().encode("utf-8")  # a lone surrogate is escaped, not a crash
    surrogate = json.loads(lines[4])
    assert surrogate["event_id"] == "surrogate"


def _summary_value(summary: str, label: str) -> int:
    [line] = [line for line in summary.splitlines() if line.strip().startswith(label + "  ")]
    return int(line.split()[-1])


def test_run_reads_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(FILE)
    dead_prefix = tmp_path / "out" / "dead_letters"
    code = cli_main(["run", "--input", str(events), "--config", CONFIG, "--dry_run",
                     "--dead_letter_path", str(dead_prefix)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err

    calls = [json.loads(line) for line in out.splitlines()]
    letters = [json.loads(line) for path in dead_prefix.parent.glob("dead_letters-*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert [d["stage"] for d in letters] == ["parse"] * 3
    not_utf8 = sorted(d["payload"] for d in letters if d["payload_encoding"] == "base64")
    assert len(not_utf8) == 2 and all(d["reason"] for d in letters)
    assert _summary_value(err, "blank lines skipped (files)") == 2
    assert _summary_value(err, "events in") == 7
    assert _summary_value(err, "dead letters: parse") == 3
    assert not list(tmp_path.rglob("beam-temp-*"))

    simulated = list(simulate(load_config_file(CONFIG).config, io.BytesIO(FILE)))
    planned = Counter(record["event_id"] for record in simulated
                      for method, _ in record["calls"] if method == "create_event")
    assert Counter(c["event_id"] for c in calls if c["method"] == "create_event") == planned


def test_compressed_and_several_files(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Compression is known by the extension, as with Beam's ReadFromText; a pattern reads
    every file it matches."""
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as handle:
        handle.write(FILE)
    (tmp_path / "b.jsonl").write_bytes(_event("plain") + b"\n")
    code = cli_main(["run", "--input", str(tmp_path / "*.jsonl*"), "--config", CONFIG,
                     "--dry_run", "--dead_letter_path", str(tmp_path / "out" / "dead")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _summary_value(err, "events in") == 8
    assert {json.loads(line)["event_id"] for line in out.splitlines()} >= {"bom", "plain"}


def test_input_that_matches_nothing_is_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["run", "--input", str(tmp_path / "missing-*.jsonl"), "--config", CONFIG,
                     "--dry_run", "--dead_letter_path", str(tmp_path / "dead")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"walkeros-klaviyo run: --input {tmp_path / 'missing-*.jsonl'}: no file matches"]
