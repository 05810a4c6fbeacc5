"""Pipeline throughput: the batch job's delivery rate against Klaviyo's bulk-events ceiling.

    python -m bench.pipeline_throughput [--events 20000] [--latency 0.2] [--scale 10]
                                        [--shards 8] [--runs 3]
    python -m bench.pipeline_throughput --minutes 1 --scale 1 --shards 4 [--runs 3]

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

Reading the figure: 20,000 events are only ~24 requests, so one request early or late moves it
by several points. At `--scale 10` the ceiling is 25 requests a second from one process, about
30 ms of CPU each (decoding, planning, validating and encoding, HTTP): close to all of one core,
so on a small shared machine a run is at the machine's limit (README: Benchmarks has the
figures). A key's requests go one after another, and each counts against the key's burst
window from its answer on (transforms/klaviyo/rate_limit.py): with 8 keys, each allowed one
request per burst window (0.1 s here), a key sends at most one request every 0.3 s (0.2 s
for the answer, then 0.1 s), so its three requests take at least 0.8 s of the 0.92 s that
24 requests take at the ceiling; how late the last key starts (its decoding, planning and
encoding share the CPU with the others') decides the rest. At `--scale 1` so short a job
fits in Klaviyo's burst allowance (10 a second) and the figure exceeds 100 %. Concurrency
itself shows in the server's log: the shards' requests overlap.

`--minutes M` measures the sink through the pipeline at any scale, real limits included
(issue 12: ≥ 95 % at `--scale 1`, ≥ 90 % at `--scale 4`), the way bench/sink_throughput.py
defines the ceiling over a run: the events of the bulk requests answered inside a window of
exactly M Klaviyo minutes, as a share of M × 150,000 (`in_window_share`). Whole minutes are fair:
the sink's limiters never allow more than 150 requests in any minute, so the burst allowance
cannot flatter the figure. The window opens when the first bulk request arrives, so the job's
parse, plan and shuffle before its window-end flush are not counted; for the sink to have work
for the whole window the input holds 15 % more events than the window can take (the default
`--events`), and the job runs as one FnApiRunner run (`--local_partitions 1`: split runs, one
per 100,000 lines, would flush one after another with planning gaps between them). Printed
with it: bulk requests per 1,000 events stored, and the job's CPU per bulk request from the
first request's arrival to the last one's answer (read from /proc every 50 ms: the flush's
decoding, planning, encoding and HTTP of every shard; the first shard's preparation before its
first request is not in it, nor the job's shutdown), and the run's wall time: at `--scale 1`
about three minutes, the planning, the window, and the requests left over for the next minute.
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
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


def share_of_ceiling(requests: Sequence[LoggedRequest]) -> float:
    """The delivered rate as a share of the ceiling, from the server's log."""
    accepted = [entry for entry in requests if entry.route == BULK_EVENTS and entry.status == 202]
    events = sum(entry.events for entry in accepted)
    if len(accepted) < 2:
        return 0.0
    span_minutes = (accepted[-1].at - accepted[0].at) / 60
    per_request = events / len(accepted)
    rate = (len(accepted) - 1) * per_request / span_minutes
    return rate / CEILING_PER_MINUTE


def in_window_share(requests: Sequence[LoggedRequest], *, minutes: float, latency: float
                    ) -> float:
    """The share of the ceiling of the bulk events accepted and answered within
    `minutes` Klaviyo minutes of the first bulk request's arrival (bench/sink_throughput.py's
    measure: delivered in a window of whole minutes against minutes × the ceiling). `at` and
    `latency` are in Klaviyo seconds."""
    bulk = [entry for entry in requests if entry.route == BULK_EVENTS]
    if not bulk:
        return 0.0
    window_end = min(entry.at for entry in bulk) + minutes * 60
    inside = [entry for entry in bulk
              if entry.status == 202 and entry.at + latency <= window_end]
    return sum(entry.events for entry in inside) / (minutes * CEILING_PER_MINUTE)


@dataclass(frozen=True)
class Run:
    share: float
    stored: int
    job_cpu_seconds: float
    bulk_requests: int  # any status
    sink_cpu_per_request: float | None  # seconds, from the first bulk request to the last answer


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (all its threads), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_samples(pid: int, every: float = 0.05) -> Iterator[list[tuple[float, float]]]:
    """(time.monotonic(), CPU seconds) of process `pid`, sampled every `every` s until the block
    ends; CLOCK_MONOTONIC is the clock of the server's log too (its `at` / scale)."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                samples.append((time.monotonic(), cpu))
            stop.wait(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def cpu_at(samples: Sequence[tuple[float, float]], moment: float) -> float | None:
    """The CPU seconds sampled last at or before `moment`."""
    before = [cpu for at, cpu in samples if at <= moment]
    return before[-1] if before else None


def run_once(lines: Sequence[str], *, latency: float, scale: float, shards: int,
             minutes: float | None = None) -> Run:
    """One run: with `minutes`, the share is `in_window_share` (the job as one FnApiRunner run);
    without, `share_of_ceiling`."""
    with tempfile.TemporaryDirectory() as tmp, \
            server_process(scale, _serve, latency) as (url, api_key, conn):
        events, config = Path(tmp) / "events.jsonl", Path(tmp) / "config.json"
        events.write_text("\n".join(lines) + "\n", encoding="utf-8")
        config.write_text(json.dumps(CONFIG), encoding="utf-8")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        command = [sys.executable, "-m", "pipeline", "--input", str(events),
                   "--config", str(config), "--dead_letter_path", f"{tmp}/dead",
                   "--klaviyo_base_url", url, "--klaviyo_api_key", api_key,
                   "--rate_limit_scale", str(scale), "--sink_shards", str(shards)]
        if minutes is not None:
            command += ["--local_partitions", "1"]
        job = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stderr=subprocess.DEVNULL)
        with cpu_samples(job.pid) as samples:
            if job.wait() != 0:
                raise subprocess.CalledProcessError(job.returncode, command)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        conn.send("stop")
        requests: list[LoggedRequest] = conn.recv()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    bulk = [entry for entry in requests if entry.route == BULK_EVENTS]
    stored = sum(entry.events for entry in bulk if entry.status == 202)
    if minutes is None:
        share = share_of_ceiling(requests)
    else:
        share = in_window_share(requests, minutes=minutes, latency=latency * scale)
    sink_cpu = None
    if bulk and samples:
        started = cpu_at(samples, min(entry.at for entry in bulk) / scale)
        ended = cpu_at(samples, max(entry.at for entry in bulk) / scale + latency)
        if started is not None and ended is not None:
            sink_cpu = (ended - started) / len(bulk)
    return Run(share, stored, cpu, len(bulk), sink_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=None,
                        help="input events (default 20,000; with --minutes M, M x 172,500)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per response")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="limits (and the server's clock) this many times Klaviyo's")
    parser.add_argument("--shards", type=int, default=8, help="--sink_shards of the job")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--minutes", type=float, default=None,
                        help="measure delivery in a window of this many Klaviyo minutes "
                             "(module docstring) instead of over the whole span")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 20_000 if args.minutes is None else \
            round(1.15 * args.minutes * CEILING_PER_MINUTE)
    lines = product_views(args.events)
    measure = ("over the span of its requests" if args.minutes is None else
               f"in a window of {args.minutes:g} Klaviyo minutes "
               f"({args.minutes * 60 / args.scale:g} s) from the first request")
    print(f"{args.events:,} events, {args.latency:g} s per response, limits x{args.scale:g} "
          f"(ceiling {CEILING_PER_MINUTE * args.scale / 60:,.0f} events per second), "
          f"{args.shards} shards; delivery {measure}", flush=True)
    runs = []
    for number in range(1, args.runs + 1):
        started = time.monotonic()
        run = run_once(lines, latency=args.latency, scale=args.scale, shards=args.shards,
                       minutes=args.minutes)
        elapsed = time.monotonic() - started
        runs.append(run)
        sink_cpu = ("?" if run.sink_cpu_per_request is None
                    else f"{run.sink_cpu_per_request * 1000:.0f} ms")
        print(f"run {number}: {run.share:.1%} of the scaled ceiling; {run.stored:,} events "
              f"stored; {1000 * run.bulk_requests / max(1, run.stored):.3f} bulk requests per "
              f"1,000 events; job CPU {run.job_cpu_seconds:.1f} s, of which {sink_cpu} per "
              f"bulk request from the first to the last; {elapsed:.0f} s", flush=True)
    per_request = [run.sink_cpu_per_request for run in runs
                   if run.sink_cpu_per_request is not None]
    cpu_text = (f"; client CPU per bulk request {statistics.median(per_request) * 1000:.0f} ms"
                if per_request else "")
    print(f"median: {statistics.median(run.share for run in runs):.1%} of the scaled "
          f"bulk-events ceiling; "
          f"{statistics.median(1000 * r.bulk_requests / max(1, r.stored) for r in runs):.3f} "
          f"requests per 1,000 events{cpu_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
