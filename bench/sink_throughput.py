"""Sink throughput: delivered events per Klaviyo minute against Klaviyo's bulk-events ceiling.

    .venv/bin/python -m bench.sink_throughput [--scale 1] [--minutes 3] [--runs 3] [--threads 4]

The ceiling is Klaviyo's published limit for POST /api/event-bulk-create-jobs, 150 requests per
minute (10 per second in bursts) × 1000 events per request = 150,000 events per minute. The local
test server (tests/klaviyo_server.py) enforces those limits in fixed windows, with its clock
running `--scale` times faster; the delivery layer gets the same `rate_limit_scale`.

What is driven, and why: `KlaviyoSender.send_events` (the call the sink's flush makes with each
batch of up to `batch_max_events` calls) from `--threads` threads, each standing for one of the
sink's shard keys: its own sender and rate limiter at `1/threads` of the account limit (as the
sink builds them), all sharing one client. This measures everything between a full batch and
Klaviyo: bulk planning, the per-key limiters, the SDK's validation and serialization, retries,
429 handling. The per-key share rounds down to whole requests per minute (150/4 → 37), so four
keys can use at most 148 of the 150 requests a minute (98.7 %). The whole pipeline is measured
by bench/pipeline_throughput.py.

Measuring honestly:
- The server runs in its own process: it parses and validates every body like Klaviyo
  (≈11 ms of CPU per 1000-event request), and in the benchmark's process it would compete for
  the GIL with the SDK.
- A 1000-event request costs about 20-25 ms of CPU in the delivery layer (bench/sdk_request_cost.py:
  one validation by the SDK's model, our encoding of it), so the ceiling of 2.5·s requests per
  second at scale s needs about 6 % of a core per unit of scale; the server's work is in its own
  process.
- Each run gets a fresh server (empty rate-limit windows) and a fresh delivery stack.
- Events delivered are those of requests that completed inside a window of exactly `--minutes`
  Klaviyo minutes from the moment the threads start, so the start-up costs (first SDK call,
  connections) count against the result, and the requests still in flight when the window closes
  do not count for it. No warm-up is excluded: the limiter never allows more than 150 requests in
  any minute, so a window of whole minutes cannot be flattered by the first minute's full quota.
- After the window, the threads finish the batches they hold; then the server's stored events are
  compared with every event handed to the sender: the difference (lost) must be 0.
- Bodies are create_event calls planned from the bundled e-commerce sample (examples/), each with
  a unique `unique_id` per batch so the server stores every one.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pipeline.bench import EXAMPLES, event_mix
from pipeline.simulate import Simulation
from tests.klaviyo_server import BULK_EVENTS, KlaviyoTestServer
from transforms.klaviyo.bulk import MAX_EVENTS_PER_REQUEST
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.rate_limit import PUBLISHED_LIMITS, Endpoint, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import DeadLetter, Delivered, KlaviyoSender, PlannedCall
from transforms.klaviyo.wire import CREATE_EVENT
from transforms.walkeros.config import load_config_file

LIMIT = PUBLISHED_LIMITS[Endpoint.BULK_EVENTS]
CEILING_PER_MINUTE = LIMIT.steady_per_minute * MAX_EVENTS_PER_REQUEST
_PLAN_TIME_MS = 1_764_400_000_000  # a fixed "now" for planning the sample


@dataclass(frozen=True)
class ServerTotals:
    """What the server kept and saw during one run."""

    stored_events: int
    requests: int  # bulk events requests, any status
    throttled: int  # of which answered 429
    cpu_seconds: float  # the server process's


@dataclass(frozen=True)
class RunResult:
    scale: float
    minutes: float
    delivered_in_window: int
    planned: int
    dead_letters: int
    pending: int  # not settled by a send's deadline (two Klaviyo minutes)
    client_cpu_seconds: float  # this process's, over the run
    server: ServerTotals

    @property
    def per_minute(self) -> float:
        return self.delivered_in_window / self.minutes

    @property
    def fraction(self) -> float:
        return self.per_minute / CEILING_PER_MINUTE

    @property
    def requests_per_1000(self) -> float:
        return 1000 * self.server.requests / self.planned

    @property
    def lost(self) -> int:
        return self.planned - self.server.stored_events


def event_templates(count: int = MAX_EVENTS_PER_REQUEST) -> list[Mapping[str, Any]]:
    """`count` distinct create_event bodies planned from the bundled sample."""
    simulation = Simulation(load_config_file(str(EXAMPLES / "flow.json")).config)
    templates: list[Mapping[str, Any]] = []
    raw_events = iter(event_mix(10 * count))
    while len(templates) < count:
        _, calls = simulation.plan(next(raw_events), now_ms=_PLAN_TIME_MS)
        templates += [call.body for call in calls if call.method == CREATE_EVENT]
    return templates[:count]


def batch_calls(templates: Sequence[Mapping[str, Any]], batch: int) -> list[PlannedCall]:
    """The calls of batch number `batch`: every template once, each with its own unique_id."""
    calls: list[PlannedCall] = []
    for index, body in enumerate(templates):
        data = body["data"]
        attributes = {**data["attributes"], "unique_id": f"bench-{batch}-{index}"}
        calls.append((CREATE_EVENT, {"data": {**data, "attributes": attributes}}))
    return calls


def _serve(conn: Connection, scale: float) -> None:
    """The server process: send the URL, serve until told to stop, send the totals."""
    with KlaviyoTestServer(time_scale=scale) as server:
        conn.send((server.url, server.api_key))
        conn.recv()
        statuses = server.statuses(BULK_EVENTS)
        conn.send(ServerTotals(len(server.events), len(statuses), statuses.count(429),
                               time.process_time()))


@contextmanager
def server_process(scale: float, serve: Callable[..., None] | None = None, *args: Any
                   ) -> Iterator[tuple[str, str, Connection]]:
    """A test server in a child process: (url, api key, connection to ask for the totals).

    `serve(conn, scale, *args)` runs in the child (default: this benchmark's `_serve`); it sends
    the address first, then answers one request on the connection before it stops."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=serve or _serve, args=(theirs, scale, *args), daemon=True)
    process.start()
    try:
        url, api_key = ours.recv()
        yield url, api_key, ours
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def run_once(templates: Sequence[Mapping[str, Any]], *, scale: float, minutes: float,
             threads: int) -> RunResult:
    """One measured run against a fresh server and a fresh delivery stack."""
    cpu_before = time.process_time()
    with server_process(scale) as (url, api_key, conn):
        client = KlaviyoClient(api_key, test_host=url)
        gc.freeze()  # as the sink's setup does: full collections skip what is loaded by now
        batches = itertools.count()
        lock = threading.Lock()
        started = time.monotonic()
        window_end = started + minutes * 60 / scale
        in_window = planned = dead = pending = 0

        def work() -> None:
            nonlocal in_window, planned, dead, pending
            limiter = RateLimiter(scale=scale, share=1 / threads)
            sender = KlaviyoSender(client, limiter, Retrier(RetryPolicy()))
            while True:
                with lock:
                    if time.monotonic() >= window_end:
                        return
                    batch = next(batches)
                    planned += len(templates)
                deadline = time.monotonic() + 120 / scale
                outcomes = sender.send_events(batch_calls(templates, batch), deadline=deadline)
                done = time.monotonic()
                delivered = sum(isinstance(outcome, Delivered) for outcome in outcomes)
                with lock:
                    dead += sum(isinstance(outcome, DeadLetter) for outcome in outcomes)
                    pending += len(outcomes) - delivered
                    if done < window_end:
                        in_window += delivered

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        conn.send("stop")
        totals: ServerTotals = conn.recv()
    client_cpu = time.process_time() - cpu_before
    return RunResult(scale, minutes, in_window, planned, dead, pending - dead, client_cpu, totals)


def print_run(number: int, result: RunResult) -> None:
    print(f"run {number}: {result.delivered_in_window:,} events delivered in "
          f"{result.minutes:g} Klaviyo minutes ({result.minutes * 60 / result.scale:g} s) = "
          f"{result.per_minute:,.0f} events/min = "
          f"{result.fraction:.1%} of the ceiling; {result.requests_per_1000:.3f} requests per "
          f"1000 events; {result.server.throttled} x 429; {result.dead_letters} dead letters, "
          f"{result.pending} pending; "
          f"lost {result.lost} ({result.planned:,} planned, {result.server.stored_events:,} "
          f"stored); CPU per request: {per_request(result.client_cpu_seconds, result):.0f} ms "
          f"here, {per_request(result.server.cpu_seconds, result):.0f} ms in the server",
          flush=True)


def per_request(seconds: float, result: RunResult) -> float:
    return 1000 * seconds / max(1, result.server.requests)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="Klaviyo seconds per real second, for the server and the limiter")
    parser.add_argument("--minutes", type=float, default=3.0,
                        help="measured window in Klaviyo minutes (whole minutes are fair)")
    parser.add_argument("--runs", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--threads", type=int, default=4,
                        help="sending threads, like the sink's shards in one worker")
    args = parser.parse_args(argv)
    templates = event_templates()
    print(f"bulk events ceiling: {LIMIT.steady_per_minute:g} requests/min x "
          f"{MAX_EVENTS_PER_REQUEST} events = {CEILING_PER_MINUTE:,.0f} events/min "
          f"(burst {LIMIT.burst_per_second:g}/s); scale {args.scale:g} "
          f"(a Klaviyo minute lasts {60 / args.scale:g} s), {args.threads} threads", flush=True)
    results = []
    for number in range(1, args.runs + 1):
        result = run_once(templates, scale=args.scale, minutes=args.minutes,
                          threads=args.threads)
        print_run(number, result)
        results.append(result)
    median = statistics.median(result.fraction for result in results)
    lost = sum(result.lost for result in results)
    print(f"median: {median:.1%} of the ceiling "
          f"({median * CEILING_PER_MINUTE:,.0f} events per Klaviyo minute); "
          f"events lost in all runs: {lost}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
