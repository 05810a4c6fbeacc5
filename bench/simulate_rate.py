"""`simulate` over a file, as a whole process: events per second of CPU time, start-up included.

    .venv/bin/python -m bench.simulate_rate [--events 50000] [--users 2500] [--runs 5]

Issue 12's figure: parse + map + plan + identify decision + output at twice the walkerOS 4.4.0
Klaviyo destination's rate per core, which planned the same bench stream at about 18,900 events/s
on one core of the development machine (driven through its collector on Node 20, SDK mocked).

What is measured: `walkeros-klaviyo simulate --config examples/flow.json --input FILE` run as a
child process (Python start-up, imports, config loading, reading the file, planning, writing
every output line to /dev/null), its user + system CPU time taken from the kernel's accounting
of finished children. CPU time rather than wall time because the machine is shared: other
processes stretch the wall clock, not the work done. One process is one thread, so one core.

The stream is the bundled e-commerce sample (examples/events.jsonl) repeated with distinct ids,
its users reused so that `--users` profiles build up identify state (bench stream of issue 12:
50,000 events, 2,500 users). The median of `--runs` runs is printed with its ratio to 18,900.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.bench import EXAMPLES, REFERENCE_EVENTS_PER_SECOND, event_mix

ROOT = Path(__file__).resolve().parent.parent


def child_cpu_seconds(argv: Sequence[str]) -> float:
    """User + system CPU time of one child process run to its end, output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.devnull, "wb") as sink:
        subprocess.run(argv, stdout=sink, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--users", type=int, default=2_500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default=str(EXAMPLES / "flow.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        stream = Path(folder) / "events.jsonl"
        stream.write_bytes(b"\n".join(event_mix(args.events, users=args.users)) + b"\n")
        command = [sys.executable, "-m", "pipeline.cli", "simulate", "--config", args.config,
                   "--input", str(stream)]
        empty = Path(folder) / "empty.jsonl"
        empty.write_bytes(b"")
        start_up = statistics.median(child_cpu_seconds(command[:-1] + [str(empty)])
                                     for _ in range(args.runs))
        seconds = [child_cpu_seconds(command) for _ in range(args.runs)]
    rates = [args.events / spent for spent in seconds]
    median = statistics.median(rates)
    print(f"simulate, whole process: {args.events} events, {args.users} users, {args.runs} runs, "
          f"CPU time of one process")
    print(f"runs (events/s): {', '.join(f'{rate:,.0f}' for rate in rates)}")
    print(f"start-up (empty input): {start_up:.2f} s of CPU")
    print(f"median: {median:,.0f} events/s, {median / REFERENCE_EVENTS_PER_SECOND:.2f}x the "
          f"reference ({REFERENCE_EVENTS_PER_SECOND:,} events/s)")
    return median


if __name__ == "__main__":
    main()
