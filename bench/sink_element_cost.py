"""The sink's CPU cost per element as its buffer grows: one-element bundles with a state cache.

    .venv/bin/python -m bench.sink_element_cost [--buffered 1000] [--runs 3]

Issue 12: on a streaming runner that caches user state across bundles, each element of the sink
arrives in a bundle of its own, and the SDK harness's state cache re-weighs what it holds on
every commit. The sink's cost per element must not grow with what is buffered.

What runs: the sink's DoFn (transforms/sink.py `_SendFlushes`, streaming) with Beam's own state
machinery, as the SDK harness builds it for a bundle: `SynchronousBagRuntimeState` and
`ReadModifyWriteRuntimeState` over a `GlobalCachingStateHandler` with a 100 MB `StateCache`
(sized by Beam's `statecache.get_deep_size`, objsize) and one user-state cache token for all
bundles, as Dataflow gives when `--max_cache_memory_usage_mb` is set; under it FnApiRunner's
in-memory `StateServicer`. Timers are recorded (Beam's `RuntimeTimer`), not fired. Each
bundle: one `process` call, then every state cell commits, as at the end of a bundle.

First a real flush empties the buffer (one event sent to the local Klaviyo test server), so the
cache holds the buffer as a list, as it does on a key after its first flush; then elements are
added one bundle each, and the CPU time (time.process_time) of each bundle is taken. Printed:
the median cost of the bundles around 1, 100 and 1,000 (`--buffered`) buffered calls, and the
ratio of the last to the first. The batch size is set above `--buffered`, so no flush interferes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability.fn_api_runner.worker_handlers import StateServicer
from apache_beam.runners.worker.bundle_processor import (
    ReadModifyWriteRuntimeState,
    SynchronousBagRuntimeState,
)
from apache_beam.runners.worker.sdk_worker import GlobalCachingStateHandler
from apache_beam.runners.worker.statecache import StateCache
from apache_beam.transforms.userstate import RuntimeTimer
from apache_beam.transforms.window import GlobalWindow

from tests.klaviyo_server import KlaviyoTestServer
from transforms.elements import Envelope, OutgoingEvent
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.plan import Call
from transforms.klaviyo.wire import CREATE_EVENT
from transforms.sink import SinkSettings, _SendFlushes

KEY = "shard/0"
CACHE_BYTES = 100 << 20  # the SDK harness's cache size when it is on (FnApiRunner's too)
_CELLS = {"buffer": BytesCoder(), "count": VarIntCoder(), "work": BytesCoder(),
          "memory": BytesCoder(), "pacing": BytesCoder()}
_USER_STATE = beam_fn_api_pb2.ProcessBundleRequest.CacheToken(
    user_state=beam_fn_api_pb2.ProcessBundleRequest.CacheToken.UserState(), token=b"user")


def event(index: int) -> OutgoingEvent:
    """A product view of one of 50 profiles, about as big as the bench stream's."""
    email = f"user{index % 50}@example.org"
    body = {"data": {"type": "event", "attributes": {
        "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product"}}},
        "properties": {"ProductID": f"p-{index % 40}", "ProductName": "Everyday Ruck Snack",
                       "Price": 42.5, "Categories": ["bags", "daypacks"]},
        "time": "2026-11-28T10:00:00.000Z", "unique_id": f"e-{index}"}}}
    payload = (b'{"name":"product view","id":"e-%d","data":{"id":"p-%d"},"user":{"id":"u-%d"}}'
               % (index, index % 40, index % 50))
    return OutgoingEvent(Envelope(payload), f"e-{index}", email, 1.7e12 + index,
                         event=Call(CREATE_EVENT, body))


class Harness:
    """Beam's state machinery for one key of the sink, bundle by bundle (module docstring)."""

    def __init__(self) -> None:
        self.cache = StateCache(CACHE_BYTES)
        self.handler = GlobalCachingStateHandler(self.cache, StateServicer())
        self.timers = {"delay": RuntimeTimer(), "window_end": RuntimeTimer()}  # record only
        self._bundles = 0

    @contextmanager
    def bundle(self) -> Iterator[dict[str, Any]]:
        """The key's state cells for one bundle, committed at its end."""
        self._bundles += 1
        with self.handler.process_instruction_id(f"bundle-{self._bundles}", [_USER_STATE]):
            bags = {name: SynchronousBagRuntimeState(self.handler, self._state_key(name), coder)
                    for name, coder in _CELLS.items()}
            cells = {name: bag if name == "buffer" else ReadModifyWriteRuntimeState(bag)
                     for name, bag in bags.items()}
            yield cells
            for cell in cells.values():
                cell.commit()

    @staticmethod
    def _state_key(name: str) -> beam_fn_api_pb2.StateKey:
        return beam_fn_api_pb2.StateKey(bag_user_state=beam_fn_api_pb2.StateKey.BagUserState(
            transform_id="sink/send", user_state_id=name, window=b"global",
            key=KEY.encode()))


def element_costs(buffered: int, server: KlaviyoTestServer) -> list[float]:
    """CPU seconds of each of `buffered` one-element bundles, after a first flush."""
    settings = SinkSettings(ApiKeySource(literal=server.api_key), base_url=server.url,
                            batch_max_events=buffered + 10, shards=1)
    sink = _SendFlushes(settings, streaming=True)
    sink.setup()
    harness = Harness()
    with harness.bundle() as cells:
        list(sink.process((KEY, event(0)), window=GlobalWindow(), delay=harness.timers["delay"],
                          window_end=harness.timers["window_end"], **cells))
    with harness.bundle() as cells:  # the delay timer fires: the buffer is sent and cleared
        list(sink.on_delay(KEY, delay=harness.timers["delay"], **cells))
    costs = []
    for index in range(1, buffered + 1):
        started = time.process_time()
        with harness.bundle() as cells:
            for _ in sink.process((KEY, event(index)), window=GlobalWindow(),
                                  delay=harness.timers["delay"],
                                  window_end=harness.timers["window_end"], **cells):
                pass
        costs.append(time.process_time() - started)
    sink.teardown()
    return costs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink_element_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--buffered", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    points = sorted({1, min(100, args.buffered), args.buffered})
    per_point: dict[int, list[float]] = {point: [] for point in points}
    with KlaviyoTestServer() as server:
        for _ in range(args.runs):
            costs = element_costs(args.buffered, server)
            for point in points:
                window = costs[max(0, point - 5):point + 5]
                per_point[point].append(statistics.median(window))
    print(f"sink, one-element bundles, Beam state cache on ({CACHE_BYTES >> 20} MB, one "
          f"user-state token), {args.runs} runs, CPU time per element (medians)")
    medians = {point: statistics.median(values) for point, values in per_point.items()}
    for point, value in medians.items():
        print(f"  {point:>5} buffered: {value * 1e6:8.0f} µs")
    print(f"ratio {points[-1]} / 1 buffered: {medians[points[-1]] / medians[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
