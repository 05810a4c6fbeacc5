"""The account-wide rate limit holds when the sink's keys send from several OS processes.

Dataflow places the `shard/N` keys on whatever SDK processes it runs (several per VM, moved as
it autoscales). Each key paces itself at `1/shards` of the account limit, so the keys together
stay within it wherever they run. Here each key is a process of its own with its own sender, all
sending at the same time to one test server that enforces the limit in Klaviyo's fixed windows
(with its clock scaled): every full window stays within the limit, and the full windows together
carry at least 90 % of it. The control case (each key believing it owns the whole account) shows
the check can fail. The whole job runs the same way on FnApiRunner with several SDK worker
processes.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from tests.klaviyo_server import BULK_EVENTS, KlaviyoTestServer
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import Delivered, KlaviyoSender

ROOT = Path(__file__).parents[1]
SHARDS = 4
LIMIT = Limit(4, 20)  # per second / per minute: small, so a few seconds show many windows
SCALE = 10.0  # a Klaviyo minute lasts 6 real seconds: long beside a busy machine's stalls
EVENTS_PER_REQUEST = 5


def event(unique_id: str, email: str) -> tuple[str, dict[str, object]]:
    attributes = {
        "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product"}}},
        "properties": {},
        "time": "2026-01-01T00:00:00+00:00",
        "unique_id": unique_id,
    }
    return "create_event", {"data": {"type": "event", "attributes": attributes}}


def shard_key(url: str, api_key: str, shard: int, share: float, seconds: float,
              ready: multiprocessing.Queue[int], start: Event,
              results: multiprocessing.Queue[tuple[int, int]]) -> None:
    """One sink key in its own process: send full batches for `seconds` after `start`."""
    limiter = RateLimiter({Endpoint.BULK_EVENTS: LIMIT}, scale=SCALE, share=share)
    retrier = Retrier(RetryPolicy(first_backoff_seconds=0.02, max_backoff_seconds=0.1))
    sender = KlaviyoSender(KlaviyoClient(api_key, test_host=url), limiter, retrier)
    ready.put(shard)
    start.wait()
    stop = time.monotonic() + seconds
    sent = delivered = 0
    while time.monotonic() < stop:
        calls = [event(f"s{shard}-{sent + i}", f"shard{shard}@example.com")
                 for i in range(EVENTS_PER_REQUEST)]
        sent += len(calls)
        outcomes = sender.send_events(calls, deadline=time.monotonic() + 120 / SCALE)
        delivered += sum(isinstance(outcome, Delivered) for outcome in outcomes)
    results.put((sent, delivered))


def run_keys(share: float, seconds: float) -> tuple[KlaviyoTestServer, list[tuple[int, int]]]:
    """SHARDS keys, each in its own process, sending for `seconds` at once to one server.

    They start together once every one has imported and built its sender (a spawned process
    imports the job's modules first: seconds on a busy machine). A key that started late would
    also stop late, and the windows where only some keys send would count as under-used."""
    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[int] = context.Queue()
    start = context.Event()
    results: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    server = KlaviyoTestServer(time_scale=SCALE).start()
    server.rate_limits[BULK_EVENTS] = (int(LIMIT.burst_per_second),
                                       int(LIMIT.steady_per_minute))
    processes = [context.Process(target=shard_key,
                                 args=(server.url, server.api_key, shard, share, seconds, ready,
                                       start, results))
                 for shard in range(SHARDS)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=120)
    start.set()
    totals = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    server.stop()
    return server, totals


def accepted_per_window(server: KlaviyoTestServer) -> list[int]:
    """Accepted bulk requests in each full steady window (Klaviyo's fixed minutes) while every
    key was sending: the first and last windows are partial and left out."""
    windows = Counter(int(entry.at // 60) for entry in server.requests(BULK_EVENTS)
                      if entry.status == 202)
    first, last = min(windows), max(windows)
    return [windows[index] for index in range(first + 1, last)]


def uses_the_limit(counts: list[int]) -> bool:
    """The full windows together carry at least 90 % of what the limit allows. Every window
    must stay within the limit (that is the guarantee); the use is judged over the run, as a
    stall of this shared machine can cost one window a request of every key."""
    return sum(counts) >= 0.9 * LIMIT.steady_per_minute * len(counts)


def test_keys_in_separate_processes_share_the_account_limit() -> None:
    server, totals = run_keys(share=1 / SHARDS, seconds=15)

    counts = accepted_per_window(server)
    statuses = server.statuses(BULK_EVENTS)
    assert len(counts) >= 2, counts
    assert all(count <= LIMIT.steady_per_minute for count in counts), counts
    assert uses_the_limit(counts), counts
    assert 429 not in statuses
    assert all(sent == delivered for sent, delivered in totals)
    assert len(server.stored_unique_ids()) == sum(sent for sent, _ in totals)


def test_the_check_fails_when_every_key_takes_the_whole_limit() -> None:
    """The control: with share 1 each key sends at the account's rate, four times too fast; the
    server has to refuse the excess (429) to keep its windows."""
    server, _ = run_keys(share=1.0, seconds=3)

    assert 429 in server.statuses(BULK_EVENTS)


def product_views(path: Path, count: int, users: int) -> None:
    """`count` "product view" events of the bundled example, spread over `users` users."""
    with open(ROOT / "examples" / "events.jsonl", encoding="utf-8") as sample:
        template = next(json.loads(line) for line in sample if '"product view"' in line)
    with open(path, "w", encoding="utf-8") as out:
        for index in range(count):
            user = index % users
            event = {**template, "id": f"{index:016x}", "timestamp": 1764320111033 + index,
                     "user": {**template["user"], "id": f"u-{user}",
                              "email": f"user{user}@example.org"}}
            out.write(json.dumps(event) + "\n")


def test_the_job_on_several_sdk_processes_keeps_and_uses_the_account_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = 500
    product_views(tmp_path / "events.jsonl", events, users=20)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the SDK worker processes import the job
    with KlaviyoTestServer(time_scale=SCALE) as server:
        server.rate_limits[BULK_EVENTS] = (int(LIMIT.burst_per_second),
                                           int(LIMIT.steady_per_minute))
        code = cli_main([
            "run", "--input", str(tmp_path / "events.jsonl"),
            "--config", str(ROOT / "examples" / "flow.json"),
            "--dead_letter_path", str(tmp_path / "dead"),
            "--klaviyo_base_url", server.url, "--klaviyo_api_key", server.api_key,
            "--rate_limit_scale", str(SCALE),
            "--rate_limits", f"bulk_events={LIMIT.burst_per_second:g}:"
                             f"{LIMIT.steady_per_minute:g}",
            "--batch_max_events", str(EVENTS_PER_REQUEST), "--sink_shards", str(SHARDS),
            "--runner", "FnApiRunner", "--direct_running_mode", "multi_processing",
            "--direct_num_workers", "2"])

    counts = accepted_per_window(server)
    assert code == 0
    assert len(counts) >= 2, counts
    assert all(count <= LIMIT.steady_per_minute for count in counts), counts
    assert uses_the_limit(counts), counts
    assert 429 not in server.statuses(BULK_EVENTS)
    assert len(server.stored_unique_ids()) == events
