"""One payload Klaviyo keeps failing on (a 500 for any request that carries it) among 300 events,
through the whole job: only that event is a dead letter, every other one is stored."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import main as cli_main
from pipeline.simulate import simulate
from tests.klaviyo_server import BULK_EVENTS, KlaviyoTestServer
from tests.test_klaviyo_account_limit import ROOT, product_views
from transforms.walkeros.config import load_config_file

pytest_plugins = ["tests.conftest_klaviyo"]
CONFIG = str(ROOT / "examples" / "flow.json")


def planned_unique_ids(events: Path) -> list[str]:
    with open(events, "rb") as lines:
        return [body["data"]["attributes"]["unique_id"]
                for record in simulate(load_config_file(CONFIG).config, lines)
                for method, body in record["calls"] if method == "create_event"]


def test_only_the_poison_payload_is_dead_lettered(klaviyo_server: KlaviyoTestServer,
                                                  tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    product_views(events, 300, users=30)
    unique_ids = planned_unique_ids(events)
    poison = unique_ids[137]
    klaviyo_server.poison(poison)

    code = cli_main(["run", "--input", str(events), "--config", CONFIG,
                     "--dead_letter_path", str(tmp_path / "dead"),
                     "--klaviyo_base_url", klaviyo_server.url,
                     "--klaviyo_api_key", klaviyo_server.api_key,
                     "--rate_limit_scale", str(klaviyo_server.time_scale),
                     "--max_retry_seconds", "15"])

    dead = [json.loads(line) for path in tmp_path.glob("dead*")
            for line in path.read_text(encoding="utf-8").splitlines()]
    assert code == 0
    assert len(unique_ids) == 300
    assert [(d["stage"], d["call"]["body"]["data"]["attributes"]["unique_id"]) for d in dead] == [
        ("sink", poison)]
    assert "500" in dead[0]["reason"]
    stored = [str(unique_id) for unique_id in klaviyo_server.stored_unique_ids()]
    assert sorted(stored) == sorted(set(unique_ids) - {poison})
    assert 500 in klaviyo_server.statuses(BULK_EVENTS)
