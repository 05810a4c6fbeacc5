"""A local batch run split by profile into runs one after another (pipeline/local_backfill.py)
ends as one run does: the same profiles and events in the local Klaviyo test server, the same
dry-run calls and dead letters, each once, and one summary that adds up over the runs."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from bench.backfill import CONFIG, generate, run_command, wrong_profiles
from pipeline import local_backfill
from pipeline.cli import main as cli_main
from pipeline.local_backfill import (
    Partitioner,
    count_lines,
    input_paths,
    partition_count,
    split_input,
)
from pipeline.options import JobSettings, OptionsError, job_settings
from tests.klaviyo_server import BULK_EVENTS, KlaviyoTestServer
from tests.test_klaviyo_account_limit import product_views
from transforms.lines import BOM, split_lines
from transforms.walkeros.config import load_config_file

pytest_plugins = ["tests.conftest_klaviyo"]
EXAMPLES = Path(__file__).parents[1] / "examples"
# Lines that touch no profile: blank, not JSON, not UTF-8, no identifier.
ODD_LINES = [b"   ", b"not json", b"\xff{", b'{"name": "page view", "id": "anon"}', b"\t\r"]


def _summary(err: str) -> list[str]:
    lines = err.splitlines()
    return lines[lines.index("summary"):]


def _records(directory: Path, prefix: str, *fields: str) -> Counter[str]:
    """The JSON lines of every file `prefix*` (each part's too), reduced to `fields`."""
    found: Counter[str] = Counter()
    for path in directory.glob(prefix + "*"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            found[json.dumps({name: record[name] for name in fields} if fields else record,
                             sort_keys=True)] += 1
    return found


def _backfill_input(tmp_path: Path) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    """A shuffled backfill of 40 users changing attributes, with odd lines among the events."""
    events, truth = generate(600, 40, seed=5)
    lines = [json.dumps(event).encode() for event in events]
    for index, odd in enumerate(ODD_LINES):
        lines.insert(index * 97, odd)
    events_path, config_path = tmp_path / "events.jsonl", tmp_path / "config.json"
    events_path.write_bytes(b"\n".join(lines) + b"\n")
    config_path.write_text(json.dumps(CONFIG), encoding="utf-8")
    return events_path, config_path, truth


def _end_state(server: KlaviyoTestServer) -> tuple[list[str], list[str]]:
    """(profiles, stored events) as JSON text, sorted, with the server's own ids replaced by
    each profile's external id."""
    external = {profile_id: profile.get("external_id")
                for profile_id, profile in server.profiles.items()}
    profiles = sorted(json.dumps(profile, sort_keys=True) for profile in server.profiles.values())
    events = sorted(json.dumps([external[event.profile_id], event.metric, event.unique_id,
                                event.attributes], sort_keys=True)
                    for event in server.events.values())
    return profiles, events


def test_three_runs_end_in_klaviyo_as_one_run(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    events_path, config_path, truth = _backfill_input(tmp_path)
    results = {}
    for partitions in (1, 3):
        with KlaviyoTestServer(time_scale=60.0) as server:
            dead = tmp_path / f"dead{partitions}" / "dead"
            assert cli_main(run_command(server, events_path, config_path, dead,
                                        "--local_partitions", str(partitions))) == 0
            err = capsys.readouterr().err
            assert wrong_profiles(server, truth) == []
            results[partitions] = (_end_state(server), _summary(err),
                                   _records(dead.parent, "dead", "stage", "payload"), err)
    (one_state, one_summary, one_dead, _), (state, summary, dead_letters, err) = \
        results[1], results[3]
    assert "run 3 of 3" in err and "run 1 of 1" not in results[1][3]
    assert len(one_state[0]) == 40 and len(one_state[1]) == 600
    assert state == one_state
    assert summary == one_summary, "the counters add up to those of one run"
    assert [row.split()[-1] for row in summary if "blank lines" in row or "events in" in row] \
        == ["603", "2"]  # the 600 events and three odd lines; the two blank lines
    assert dead_letters == one_dead
    # each once: the line that is not JSON and the one that is not UTF-8 (base64); the others
    # are blank or have no identifier
    assert sorted(json.loads(record)["payload"] for record in dead_letters.elements()) == \
        ["/3s=", "not json"]


def test_a_split_dry_run_writes_the_calls_and_dead_letters_of_one_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {}
    for partitions in (1, 4):
        out = tmp_path / str(partitions)
        assert cli_main(["run", "--input", str(EXAMPLES / "events.jsonl"),
                         "--config", str(EXAMPLES / "flow.json"),
                         "--dry_run_output", str(out / "calls"),
                         "--dead_letter_path", str(out / "dead"),
                         "--local_partitions", str(partitions)]) == 0
        outputs[partitions] = (_records(out, "calls"),
                               _records(out, "dead", "stage", "reason", "payload"),
                               _summary(capsys.readouterr().err),
                               sorted(path.name for path in out.iterdir()))
    calls, dead, summary, names = outputs[4]
    assert (calls, dead, summary) == outputs[1][:3]
    assert sum(calls.values()) == 19 and sum(dead.values()) == 2
    assert "calls-part-4-of-4-00000-of-00001.jsonl" in names, names
    assert outputs[1][3] == ["calls-00000-of-00001.jsonl", "dead-00000-of-00001.jsonl"]


def test_partition_files_keep_every_line_exactly_and_each_profile_in_one(
        tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    events, _ = generate(200, 12, seed=3)
    lines = [json.dumps(event).encode() for event in events]
    # a line ending in a bare \r (before the \n that ends it); a line that starts with a BOM
    # (content, not a mark: only a file's first one is), the first line of its partition file
    odd = [*ODD_LINES, lines[0] + b"\r\r", BOM + lines[1]]
    first.write_bytes(BOM + b"\n".join([BOM + lines[2], *lines[:100], *odd]) + b"\r\n")
    second.write_bytes(b"\n".join(odd + lines[100:]))  # no newline at the end
    partitioner = Partitioner(CONFIG, 3, now_ms=1.7e12)
    out = tmp_path / "parts"
    out.mkdir()
    partitions = split_input(input_paths(str(tmp_path / "*.jsonl")), partitioner, out)

    expected: list[bytes] = []
    for path in (first, second):
        with open(path, "rb") as handle:
            expected += split_lines(handle)
    read: list[list[bytes]] = []
    for partition in partitions:
        with open(partition.path, "rb") as handle:
            read.append(list(split_lines(handle)))
        assert partition.lines == len(read[-1])
    assert len(read) == 3
    assert lines[0] + b"\r" in expected and BOM + lines[1] in expected
    assert sorted(line for part in read for line in part) == sorted(expected)
    keys = [{partitioner.profile_key(line) for line in part} - {None} for part in read]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def _settings(*extra: str) -> JobSettings:
    return job_settings(PipelineOptions(["--config", "c.json", "--dead_letter_path", "d",
                                         *extra]))


def test_the_number_of_runs_follows_the_input_size(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"{}\n" * 24 + b"{}")  # 25 lines, the last without a newline
    monkeypatch.setattr(local_backfill, "DEFAULT_PARTITION_EVENTS", 10)
    assert partition_count(_settings("--input", str(events)), "FnApiRunner") == 3
    assert partition_count(_settings("--input", str(events), "--local_partitions", "1"),
                           "FnApiRunner") == 1
    assert partition_count(_settings("--input", str(events)), "DataflowRunner") == 1
    with pytest.raises(OptionsError, match="no file matches"):
        partition_count(_settings("--input", str(tmp_path / "missing*")), "FnApiRunner")


@pytest.mark.parametrize(("extra", "message"), [
    (["--local_partitions", "-1"], "--local_partitions must not be negative"),
    (["--local_partitions", "2", "--runner", "DataflowRunner"],
     "--local_partitions is for local batch runs over files"),
])
def test_partitions_only_for_local_batch_runs(extra: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["run", "--input", str(EXAMPLES / "events.jsonl"),
                     "--config", str(EXAMPLES / "flow.json"), "--dry_run",
                     "--dead_letter_path", "unused", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_compressed_input_is_split_as_the_job_reads_it(tmp_path: Path) -> None:
    plain = (EXAMPLES / "events.jsonl").read_bytes()
    compressed = tmp_path / "events.jsonl.gz"
    compressed.write_bytes(gzip.compress(plain))
    paths = input_paths(str(compressed))
    assert count_lines(paths) == len(plain.splitlines()) == 32
    out = tmp_path / "parts"
    out.mkdir()
    config = load_config_file(str(EXAMPLES / "flow.json")).config
    partitions = split_input(paths, Partitioner(config, 2, now_ms=1.7e12), out)
    read = []
    for partition in partitions:
        with open(partition.path, "rb") as handle:
            read += split_lines(handle)
    assert sorted(read) == sorted(plain.splitlines())


def test_the_runs_of_a_split_backfill_share_the_account_limit(tmp_path: Path) -> None:
    """The runs of a split backfill go one after another in one process: each run's keys
    continue from the requests the run before made, so a run that starts inside the minute
    its predecessor used does not send a second minute's worth into it."""
    events = tmp_path / "events.jsonl"
    product_views(events, 120, users=20)  # 24 requests of 5: more than one minute's 20
    with KlaviyoTestServer(time_scale=5.0) as server:  # a Klaviyo minute is 12 s
        server.rate_limits[BULK_EVENTS] = (4, 20)
        code = cli_main(run_command(
            server, events, EXAMPLES / "flow.json", tmp_path / "dead",
            "--rate_limits", "bulk_events=4:20", "--batch_max_events", "5",
            "--sink_shards", "4", "--local_partitions", "3"))
        statuses = server.statuses(BULK_EVENTS)
        stored = server.stored_unique_ids()
    assert code == 0
    assert 429 not in statuses, statuses
    assert len(stored) == 120
