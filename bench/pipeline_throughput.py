"""Pipeline throughput: the batch job's delivery rate against Klaviyo's bulk-events ceiling.

    python -m bench.pipeline_throughput [--events 20000] [--latency 0.2] [--scale 10]
                                        [--shards 8] [--runs 3]

Unlike bench/sink_throughput.py (the delivery layer alone), this runs the whole job
(`python -m pipeline run --input …` on FnApiRunner): parse, plan, identify state, the sink's
window-end flushes (handed to a thread pool, one thread per shard key), against the local test
server in its own process, answering every request after `--latency` seconds and enforcing
Klaviyo's limits with its clock running `--scale` times faster; the job gets the same
`--rate_limit_scale`.

The ceiling is Klaviyo's bulk-events limit, 150 requests per Klaviyo minute × 1000 events. The
figure is the rate between the first and the last bulk-events request the server received
(requests − 1 intervals, each worth the average events per request), as a share of it; the
server's clock is the measure, in Klaviyo minutes. Events are product views of 2,000 users, so
that bulk events are all the job sends. CPU time of the job's process is printed too.

Reading the figure: 20,000 events are only ~24 requests. At `--scale 10` the ceiling is 25
requests a second from one process, which also runs parse, plan and the test server's client
side; on a small shared machine the job is CPU-bound well below it (measured here on 2 cores
shared with other work: medians of 29–42 %, single runs 28–48 %). At `--scale 1` so short a job
fits in Klaviyo's burst allowance (10 a second) and the figure exceeds 100 %. Concurrency itself
shows in the server's log: the shards' requests overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from bench.backfill import CONFIG, START_MS
from bench.sink_throughput import CEILING_PER_MINUTE, server_process
from tests.klaviyo_server import BULK_EVENTS, KlaviyoTestServer, LoggedRequest

ROOT = Path(__file__).parents[1]


def product_views(count: int, users: int = 2000) -> list[str]:
    return [json.dumps({"name": "product view", "id": f"pv-{index}",
                        "timestamp": START_MS + index, "data": {"id": f"p-{index % 40}"},
                        "user": {"id": f"u-{index % users}",
                                 "email": f"user{index % users}@example.org"}})
            for index in range(count)]


def _serve(conn: Connection, scale: float, latency: float) -> None:
    """The server's process: its address, then its request log when told the job is done."""
    with KlaviyoTestServer(time_scale=scale, latency_seconds=latency) as server:
        conn.send((server.url, server.api_key))
        conn.recv()
        conn.send(server.requests())


def share_of_ceiling(requests: Sequence[LoggedRequest]) -> tuple[float, int]:
    """(delivered rate as a share of the ceiling, events stored) from the server's log."""
    accepted = [entry for entry in requests if entry.route == BULK_EVENTS and entry.status == 202]
    events = sum(entry.events for entry in accepted)
    if len(accepted) < 2:
        return 0.0, events
    span_minutes = (accepted[-1].at - accepted[0].at) / 60
    per_request = events / len(accepted)
    rate = (len(accepted) - 1) * per_request / span_minutes
    return rate / CEILING_PER_MINUTE, events


def run_once(lines: Sequence[str], *, latency: float, scale: float, shards: int
             ) -> tuple[float, int, float]:
    """(share of the ceiling, events stored, CPU seconds of the job) of one run."""
    with tempfile.TemporaryDirectory() as tmp, \
            server_process(scale, _serve, latency) as (url, api_key, conn):
        events, config = Path(tmp) / "events.jsonl", Path(tmp) / "config.json"
        events.write_text("\n".join(lines) + "\n", encoding="utf-8")
        config.write_text(json.dumps(CONFIG), encoding="utf-8")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "pipeline", "--input", str(events),
                        "--config", str(config), "--dead_letter_path", f"{tmp}/dead",
                        "--klaviyo_base_url", url, "--klaviyo_api_key", api_key,
                        "--rate_limit_scale", str(scale), "--sink_shards", str(shards)],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        conn.send("stop")
        requests: list[LoggedRequest] = conn.recv()
    share, stored = share_of_ceiling(requests)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return share, stored, cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per response")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="limits (and the server's clock) this many times Klaviyo's")
    parser.add_argument("--shards", type=int, default=8, help="--sink_shards of the job")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    args = parser.parse_args(argv)
    lines = product_views(args.events)
    print(f"{args.events:,} events, {args.latency:g} s per response, limits x{args.scale:g} "
          f"(ceiling {CEILING_PER_MINUTE * args.scale / 60:,.0f} events per second), "
          f"{args.shards} shards", flush=True)
    shares = []
    for number in range(1, args.runs + 1):
        share, stored, cpu = run_once(lines, latency=args.latency, scale=args.scale,
                                      shards=args.shards)
        shares.append(share)
        print(f"run {number}: {share:.1%} of the scaled ceiling; {stored:,} events stored; "
              f"job CPU {cpu:.1f} s", flush=True)
    print(f"median: {statistics.median(shares):.1%} of the scaled bulk-events ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
