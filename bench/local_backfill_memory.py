"""Peak memory and time of a local batch dry run over a large file (issue 12: a million events
under 2 GB of peak RSS).

    python -m bench.local_backfill_memory [--events 1000000] [--users 100000]
                                          [--local_partitions 0] [--send]

Writes `--events` events of the bench mix (`pipeline.bench.event_mix`: the e-commerce sample
with distinct ids, about `--users` users) to a temporary file, then runs the batch dry run on it
as `walkeros-klaviyo run` would (`python -m pipeline --input … --dry_run_output …`,
FnApiRunner) in a child process, and prints the child's peak RSS (`ru_maxrss` of
RUSAGE_CHILDREN: the pipeline process; the generator's own memory is this process's and is
printed apart), its CPU time and wall time, and its summary's first rows. `--local_partitions`
is passed on (0: from the input size, 1: one run, as before the split existed). `--send`
sends to the local Klaviyo test server (in this process, its clock 60 times faster) instead of
a dry run, and prints how many events it stored and how many requests it throttled.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.bench import EXAMPLES, event_mix
from tests.klaviyo_server import KlaviyoTestServer

LIMIT_BYTES = 2 * 1024 ** 3
_SUMMARY_ROWS = ("events in", "calls written (dry run)", "events delivered to Klaviyo",
                 "dead letters: parse", "dead letters: sink")


def write_events(path: Path, events: int, users: int) -> None:
    """The bench mix as JSON Lines (the list is freed before the measured run starts)."""
    with open(path, "wb") as out:
        out.writelines(line + b"\n" for line in event_mix(events, users=users))


@contextmanager
def destination(send: bool, tmp: Path) -> Iterator[tuple[list[str], KlaviyoTestServer | None]]:
    """The options that say where the calls go, and the test server when they are sent."""
    if not send:
        yield ["--dry_run_output", str(tmp / "calls")], None
        return
    with KlaviyoTestServer(time_scale=60.0) as server:
        yield ["--klaviyo_base_url", server.url, "--klaviyo_api_key", server.api_key,
               "--rate_limit_scale", str(server.time_scale)], server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.local_backfill_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--local_partitions", type=int, default=0)
    parser.add_argument("--send", action="store_true",
                        help="send to the local Klaviyo test server instead of a dry run")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="local-backfill-bench-") as tmp, \
            destination(args.send, Path(tmp)) as (target, server):
        events_path = Path(tmp) / "events.jsonl"
        write_events(events_path, args.events, args.users)
        generator_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        command = [sys.executable, "-m", "pipeline", "--input", str(events_path),
                   "--config", str(EXAMPLES / "flow.json"), *target,
                   "--dead_letter_path", str(Path(tmp) / "dead"),
                   "--local_partitions", str(args.local_partitions)]
        env = {**os.environ, "PYTHONPATH": str(root)}
        started = time.monotonic()
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        stored = None if server is None else (len(server.stored_unique_ids()), sum(
            entry.status == 429 for entry in server.requests()))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    cpu = usage.ru_utime + usage.ru_stime
    print(f"{args.events:,} events (about {args.users:,} users), batch "
          f"{'run against the local Klaviyo test server' if args.send else 'dry run'} on "
          f"FnApiRunner, --local_partitions={args.local_partitions}")
    for line in done.stderr.splitlines():
        if "splitting the input" in line or any(line.strip().startswith(row + "  ")
                                                for row in _SUMMARY_ROWS):
            print(f"  {line.strip()}")
    print(f"pipeline process: peak RSS {peak / 1024 ** 2:,.0f} MB "
          f"({peak / args.events:,.0f} bytes per event; {peak / LIMIT_BYTES:.2f}x the 2 GB "
          f"limit), CPU {cpu:,.1f} s ({args.events / cpu:,.0f} events/s), wall {wall:,.1f} s")
    if stored is not None:
        print(f"events stored by the test server: {stored[0]:,}; requests answered 429: "
              f"{stored[1]:,}")
    print(f"this process (generator, test server): peak RSS {generator_rss / 1024 ** 2:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
