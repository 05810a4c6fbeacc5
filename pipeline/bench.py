"""`bench`: events per second for parse + map + plan (+ the identify decision) on one core.

The event mix is the bundled e-commerce sample (`examples/events.jsonl`: page views, logins,
product views and adds, orders with nested products, and a few skipped and invalid events),
repeated with distinct users and ids so the identify state grows as in production. Each run
plans every event from its raw JSON bytes; the median of several runs is printed.

Rates are events per second of this process's CPU time (one thread, so one core): on a shared
machine, other processes change the wall-clock time far more than the work done here.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from pipeline.simulate import Simulation
from transforms.walkeros.config import load_config_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def event_mix(count: int, sample_path: Path = EXAMPLES / "events.jsonl") -> list[bytes]:
    """`count` raw events cycling through the sample, each with its own user and id."""
    sample = sample_path.read_text(encoding="utf-8").splitlines()
    raw: list[bytes] = []
    for index in range(count):
        line = sample[index % len(sample)]
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raw.append(line.encode())  # the sample's deliberately broken lines stay broken
            continue
        if isinstance(event.get("user"), dict) and "id" in event["user"]:
            event["user"]["id"] = f"{event['user']['id']}-{index // len(sample)}"
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
            simulation.step(payload, now_ms=1_764_400_000_000)
        rates.append(events / (time.process_time() - started))
    median = statistics.median(rates)
    print(f"parse + map + plan: {events} events x {runs} runs, one core (CPU time)")
    print(f"runs (events/s): {', '.join(f'{rate:,.0f}' for rate in rates)}")
    print(f"median: {median:,.0f} events/s")
    return median
