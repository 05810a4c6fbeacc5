"""Replaying the sink's own dead letters repairs profiles (issue 8), end to end.

The profile endpoints of the local Klaviyo test server fail past a short `--max_retry_seconds`,
so the job dead-letters upserts; the server heals; the project's `replay` command sends the
recorded dead letters back, into a fresh batch job (`run --input`) or into the running streaming
job (its input topic on the Pub/Sub emulator). Every user's profile must then hold the newest
values the test's generator gave them (the truth is the generator's, not the planner's), and no
event is stored twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.backfill import generate, run_command, write_inputs, wrong_profiles
from pipeline.cli import main as cli_main
from pipeline.replay import main as replay_main
from tests.klaviyo_server import BULK_PROFILE_IMPORT, PROFILE_IMPORT, Fault, KlaviyoTestServer

pytest_plugins = ["tests.conftest_klaviyo"]

OUTAGE = 100_000  # more failures than any retry loop reaches before its deadline
SHORT_DEADLINE = ("--max_retry_seconds", "0.5")


def _fail_profiles(server: KlaviyoTestServer) -> None:
    for route in (PROFILE_IMPORT, BULK_PROFILE_IMPORT):
        server.inject(route, *[Fault.error(503)] * OUTAGE)


def _sink_upserts(directory: Path) -> list[dict[str, Any]]:
    """The upsert dead letters of the sink in the dead-letter files under `directory`."""
    records = [json.loads(line) for path in sorted(directory.glob("dead*"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [record for record in records
            if record["stage"] == "sink" and record["call"]["method"] == "create_or_update_profile"]


def test_replayed_dead_letters_repair_profiles_in_a_fresh_batch_job(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path) -> None:
    events, truth = generate(300, 20, seed=8)
    events_path, config_path = write_inputs(tmp_path, events)
    _fail_profiles(klaviyo_server)
    first = tmp_path / "first"
    assert cli_main(run_command(klaviyo_server, events_path, config_path, first / "dead",
                                *SHORT_DEADLINE)) == 0
    dead = _sink_upserts(first)
    assert {record["event_id"] for record in dead}  # the outage was real: upserts died
    assert len(wrong_profiles(klaviyo_server, truth)) == len(truth)  # and no profile is right

    klaviyo_server.clear_faults()
    replayed = tmp_path / "replay.jsonl"
    assert replay_main(["--dead_letters", str(first / "dead*"), "--stage", "sink",
                        "--output", str(replayed)]) == 0
    second = tmp_path / "second"
    assert cli_main(run_command(klaviyo_server, replayed, config_path, second / "dead",
                                *SHORT_DEADLINE)) == 0
    assert _sink_upserts(second) == []
    assert wrong_profiles(klaviyo_server, truth) == []
    stored = klaviyo_server.stored_unique_ids()
    assert sorted(stored) == sorted(event["id"] for event in events)  # each stored once
