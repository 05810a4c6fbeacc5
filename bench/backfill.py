"""A changing-attribute backfill: users whose names, plans and cities change over time.

    python -m bench.backfill [--events 20000] [--users 2000] [--code DIR]

Generates the events (shuffled, as a shuffle or a file in any order delivers them), runs the
batch job (`python -m pipeline run --input …`, FnApiRunner) on them against the local Klaviyo
test server, and prints what it cost: requests per 1,000 events, profile upserts sent (each
profile-import request and each profile in a bulk import), and whether every user's final
profile equals their newest values. `--code DIR` runs another checkout's pipeline (e.g. main's,
for a before/after comparison) against the same server and generator.

The truth is the generator's own: for each user, the values their newest identify event carried
(by event time), never what the planner made of them. Tests use the same generator
(tests/test_sink_profiles.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.klaviyo_server import BULK_PROFILE_IMPORT, PROFILE_IMPORT, KlaviyoTestServer

START_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z
FIRST_NAMES = ("Ana", "Ben", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ines", "Jon")
LAST_NAMES = ("Rao", "Smith", "Okafor", "Silva", "Novak", "Kim")
PLANS = ("free", "basic", "pro", "team")
CITIES = ("Berlin", "Lagos", "Lima", "Osaka", "Rome", "Austin")

_IDENTIFY = {"map": {"firstName": "data.firstName", "lastName": "data.lastName",
                     "location": {"map": {"city": "data.city"}},
                     "properties": {"map": {"plan": "data.plan"}}}}
CONFIG: dict[str, Any] = {
    "settings": {"email": "user.email", "externalId": "user.id"},
    "mapping": {
        "user": {"login": {"name": "Logged In", "settings": {"identify": _IDENTIFY}}},
        "order": {"complete": {"name": "Placed Order", "data": {"map": {"total": "data.total"}},
                               "settings": {"identify": _IDENTIFY, "value": "data.total"}}},
        "product": {"view": {"name": "Viewed Product", "data": {"map": {"id": "data.id"}}}},
    },
}


def generate(events: int, users: int, *, seed: int = 7
             ) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """(events in shuffled order, each user's newest values by external id)."""
    rng = random.Random(seed)
    values = [{"firstName": rng.choice(FIRST_NAMES), "lastName": rng.choice(LAST_NAMES),
               "plan": rng.choice(PLANS), "city": rng.choice(CITIES)} for _ in range(users)]
    truth: dict[str, dict[str, str]] = {}
    generated = []
    for index in range(events):
        user = rng.randrange(users)
        user_id = f"u-{user}"
        kind = rng.random()
        event: dict[str, Any] = {"id": f"ev-{index}", "timestamp": START_MS + index * 1000,
                                 "user": {"id": user_id, "email": f"user{user}@example.org"},
                                 "consent": {}}
        if kind < 0.4:  # an identify event: maybe with a change
            if rng.random() < 0.6:
                field = rng.choice(("firstName", "plan", "city", "lastName"))
                choices = {"firstName": FIRST_NAMES, "lastName": LAST_NAMES, "plan": PLANS,
                           "city": CITIES}[field]
                values[user] = {**values[user], field: rng.choice(choices)}
            name = "user login" if kind < 0.25 else "order complete"
            event |= {"name": name, "data": {**values[user], "total": 10 + index % 90}}
            truth[user_id] = dict(values[user])
        else:
            event |= {"name": "product view", "data": {"id": f"p-{index % 50}"}}
        generated.append(event)
    rng.shuffle(generated)
    return generated, truth


def profile_view(stored: dict[str, Any] | None) -> dict[str, str | None]:
    """The generator's fields of a profile as Klaviyo (the test server) holds it."""
    stored = stored or {}
    return {"firstName": stored.get("first_name"), "lastName": stored.get("last_name"),
            "plan": (stored.get("properties") or {}).get("plan"),
            "city": (stored.get("location") or {}).get("city")}


def wrong_profiles(server: KlaviyoTestServer, truth: dict[str, dict[str, str]]) -> list[str]:
    """Users whose stored profile is not their newest values."""
    return sorted(user for user, values in truth.items()
                  if profile_view(server.profile(external_id=user)) != values)


def write_inputs(directory: Path, events: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """(events file, config file) in `directory`."""
    events_path, config_path = directory / "events.jsonl", directory / "config.json"
    events_path.write_text("".join(json.dumps(event) + "\n" for event in events),
                           encoding="utf-8")
    config_path.write_text(json.dumps(CONFIG), encoding="utf-8")
    return events_path, config_path


def run_command(server: KlaviyoTestServer, events: Path, config: Path, dead: Path,
                *extra: str) -> list[str]:
    """The `run` command line of the batch job against `server`."""
    return ["run", "--input", str(events), "--config", str(config),
            "--dead_letter_path", str(dead), "--klaviyo_base_url", server.url,
            "--klaviyo_api_key", server.api_key, "--rate_limit_scale", str(server.time_scale),
            *extra]


def upserts_sent(server: KlaviyoTestServer) -> int:
    """Profile-import requests plus the profiles carried by bulk import requests."""
    return sum(1 if entry.route == PROFILE_IMPORT else _profiles_in(entry)
               for entry in server.log if entry.route in (PROFILE_IMPORT, BULK_PROFILE_IMPORT))


def _profiles_in(entry: Any) -> int:
    return len(getattr(entry, "profiles", ())) or 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--code", default=None,
                        help="checkout whose pipeline to run (default: this one)")
    args = parser.parse_args(argv)
    events, truth = generate(args.events, args.users)
    code = Path(args.code or Path(__file__).parents[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp, KlaviyoTestServer(time_scale=60.0) as server:
        events_path, config_path = write_inputs(Path(tmp), events)
        command = [sys.executable, "-m", "pipeline.cli",
                   *run_command(server, events_path, config_path, Path(tmp) / "dead")]
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run(command, check=True, cwd=code, env=env, stderr=subprocess.DEVNULL)
        routes = Counter(entry.route for entry in server.log)
        requests = sum(routes.values())
        wrong = wrong_profiles(server, truth)
        print(f"{args.events:,} events, {len(truth):,} users with identify events, code {code}")
        for route, count in sorted(routes.items()):
            print(f"  {route:<55} {count:>7,}")
        print(f"requests per 1,000 events: {1000 * requests / args.events:.2f}; profile upserts "
              f"sent: {upserts_sent(server):,}; users whose final profile is not their newest "
              f"values: {len(wrong):,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
