"""`bench`: events per second for parse + map + plan + identify decision + output on one core.

The event mix is the bundled e-commerce sample (`examples/events.jsonl`: page views, logins,
product views and adds, orders with nested products, and a few skipped and invalid events),
repeated with distinct ids and users so the identify state grows as in production. Each run
turns every raw JSON line into its `simulate` output line; the median of several runs is printed
with its ratio to the walkerOS reference destination's rate (issue 12: 18,900 events/s on one
core of the development machine, Node 20, SDK mocked). Start-up is not counted here;
`python -m bench.simulate_rate` measures `simulate` as a whole process.

Rates are events per second of this process's CPU time (one thread, so one core): on a shared
machine, other processes change the wall-clock time far more than the work done here.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from pipeline.simulate import Simulation
from transforms.walkeros.config import load_config_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REFERENCE_EVENTS_PER_SECOND = 18_900


def _decoded(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # the sample's deliberately broken lines stay broken


def _user_id(event: Any) -> Any:
    user = event.get("user") if isinstance(event, dict) else None
    return user.get("id") if isinstance(user, dict) else None


def event_mix(count: int, sample_path: Path = EXAMPLES / "events.jsonl",
              users: int | None = None) -> list[bytes]:
    """`count` raw events cycling through the sample, each with its own id; each pass over the
    sample has its own users, or, with `users`, the passes reuse about that many users."""
    sample = sample_path.read_text(encoding="utf-8").splitlines()
    per_pass = len({_user_id(_decoded(line)) for line in sample} - {None}) or 1
    passes = max(1, users // per_pass) if users else count
    raw: list[bytes] = []
    for index in range(count):
        line = sample[index % len(sample)]
        event = _decoded(line)
        if event is None:
            raw.append(line.encode())
            continue
        if _user_id(event) is not None:
            event["user"]["id"] = f"{event['user']['id']}-{index // len(sample) % passes}"
        event["id"] = f"{index:016x}"
        raw.append(json.dumps(event).encode())
    return raw


def run_bench(config_path: str | None, events: int, runs: int) -> float:
    """Print and return the median events per second over `runs` runs."""
    config = load_config_file(config_path or str(EXAMPLES / "flow.json")).config
    raw = event_mix(events)
    rates = []
    for _ in range(runs):
        simulation = Simulation(config)
        started = time.process_time()
        for payload in raw:
            simulation.step_json(payload, now_ms=1_764_400_000_000)
        rates.append(events / (time.process_time() - started))
    median = statistics.median(rates)
    print(f"parse + map + plan + identify + output: {events} events x {runs} runs, one core "
          f"(CPU time)")
    print(f"runs (events/s): {', '.join(f'{rate:,.0f}' for rate in rates)}")
    print(f"median: {median:,.0f} events/s, {median / REFERENCE_EVENTS_PER_SECOND:.2f}x the "
          f"reference ({REFERENCE_EVENTS_PER_SECOND:,} events/s)")
    return median
