"""The whole job against the local Klaviyo test server: what `simulate` plans is what Klaviyo
stores, failures are dead letters, and a replay after the fix delivers the rest once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.simulate import simulate
from tests.klaviyo_server import BULK_EVENTS, Fault, KlaviyoTestServer
from transforms.walkeros.config import load_config_file

pytest_plugins = ["tests.conftest_klaviyo"]
EXAMPLES = Path(__file__).parents[1] / "examples"
CONFIG, EVENTS = str(EXAMPLES / "flow.json"), str(EXAMPLES / "events.jsonl")


def run(server: KlaviyoTestServer, events: str, dead: Path, *extra: str) -> int:
    return cli_main(["run", "--input", events, "--config", CONFIG,
                     "--dead_letter_path", str(dead), "--klaviyo_base_url", server.url,
                     "--klaviyo_api_key", server.api_key,
                     "--rate_limit_scale", str(server.time_scale), *extra])


def planned_unique_ids() -> list[str]:
    with open(EVENTS, "rb") as lines:
        records = simulate(load_config_file(CONFIG).config, lines)
        return sorted(body["data"]["attributes"]["unique_id"] for record in records
                      for method, body in record["calls"] if method == "create_event")


def dead_letters(prefix: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in sorted(prefix.parent.glob(prefix.name + "*"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_example_is_delivered(klaviyo_server: KlaviyoTestServer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(klaviyo_server, EVENTS, tmp_path / "dead") == 0
    assert sorted(klaviyo_server.stored_unique_ids()) == planned_unique_ids()
    assert klaviyo_server.profile(email="maya@example.org")["first_name"] == "Maya"
    err = capsys.readouterr().err
    assert "events delivered to Klaviyo" in err
    assert [d["stage"] for d in dead_letters(tmp_path / "dead")] == ["parse", "parse"]


def test_failed_deliveries_are_replayed_once_after_the_fix(
        klaviyo_server: KlaviyoTestServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Klaviyo's bulk endpoint is down for the whole first run: retries give up at the deadline.
    klaviyo_server.inject(BULK_EVENTS, *[Fault.error(503)] * 50)
    assert run(klaviyo_server, EVENTS, tmp_path / "dead", "--max_retry_seconds", "1") == 0
    sink_dead = [d for d in dead_letters(tmp_path / "dead") if d["stage"] == "sink"]
    assert sink_dead and not klaviyo_server.stored_unique_ids()
    summary = capsys.readouterr().err.splitlines()
    assert [line.split()[-1] for line in summary if "sink, 503" in line] == [str(len(sink_dead))]

    klaviyo_server.clear_faults()  # Klaviyo is back
    replay = tmp_path / "replay.jsonl"
    assert cli_main(["replay", "--dead_letters", str(tmp_path / "dead*"),
                     "--output", str(replay), "--stage", "sink"]) == 0
    assert run(klaviyo_server, str(replay), tmp_path / "dead-again") == 0
    assert sorted(klaviyo_server.stored_unique_ids()) == planned_unique_ids()
    assert not [d for d in dead_letters(tmp_path / "dead-again") if d["stage"] == "sink"]
