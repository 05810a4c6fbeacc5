"""CPU time of one 1,000-event bulk request through the official SDK: ours against the SDK's own.

    .venv/bin/python -m bench.sdk_request_cost [--requests 40] [--freeze]

Both ways run through the same `KlaviyoClient` (its SDK ApiClient: base URL, auth, revision
header, urllib3 pool) against the local test server in a child process, so the server's work is
not counted. "SDK method" is `Events.bulk_create_events_with_http_info(dict)`: pydantic
validation, then the models' `to_dict` and the ApiClient's recursive sanitizer, then
`json.dumps`. "ours" is `encode_bulk_events` (one validation by the same model, its dump written
as compact UTF-8 by orjson; tests/test_klaviyo_wire.py proves it is the same JSON) and
`bulk_create_events` (the SDK's endpoint serializer, call and response handling). Each figure is
the median (and mean) CPU time (`time.process_time`) of `--requests` requests, each with fresh
unique_ids, over bodies planned from the bundled e-commerce sample; the target is 30 ms.

The SDK method's mean is higher than its median because of CPython's cyclic garbage collector:
a request allocates some 15,000 objects (the validated models, the dump), and every few requests
that triggers a full collection, whose cost grows with every object the process holds (300,000
here, millions in a Beam worker). Ours pauses the collector while it encodes (client.py), so
its mean stays near its median. `--freeze` calls `gc.freeze()` once after start-up, as the
sink's setup does: the objects of the loaded modules are then never scanned again.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from bench.sink_throughput import batch_calls, event_templates, server_process
from transforms.klaviyo.bulk import Json, plan_event_batches
from transforms.klaviyo.client import KlaviyoClient

TARGET_MS = 30.0


def cost_ms(send: Callable[[Json], object], bodies: Sequence[Json]) -> tuple[float, float]:
    """(median, mean) CPU milliseconds of sending each body."""
    costs = []
    for body in bodies:
        started = time.process_time()
        send(body)
        costs.append(time.process_time() - started)
    return statistics.median(costs) * 1000, statistics.mean(costs) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sdk_request_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per way")
    parser.add_argument("--freeze", action="store_true",
                        help="gc.freeze() after start-up (see the module docstring)")
    args = parser.parse_args(argv)
    templates = event_templates()

    def bodies(offset: int) -> list[Json]:
        return [plan_event_batches([body for _, body in batch_calls(templates, offset + i)])
                .batches[0].body() for i in range(args.requests)]

    sdk_bodies, our_bodies = bodies(0), bodies(args.requests)
    with server_process(1000.0) as (url, api_key, conn):  # limits never bind at this scale
        client = KlaviyoClient(api_key, test_host=url)
        if args.freeze:
            gc.freeze()
        sdk_method = client._events.bulk_create_events_with_http_info
        sdk = cost_ms(lambda body: sdk_method(body, _request_timeout=(5.0, 30.0)), sdk_bodies)
        ours = cost_ms(lambda body: client.bulk_create_events(client.encode_bulk_events(body)),
                       our_bodies)
        conn.send("stop")
        totals = conn.recv()
    entries = len(our_bodies[0]["data"]["attributes"]["events-bulk-create"]["data"])
    print(f"one bulk request of {len(templates)} events ({entries} profile entries), CPU over "
          f"{args.requests} requests{' (gc frozen)' if args.freeze else ''}: "
          f"SDK method median {sdk[0]:.1f} ms (mean {sdk[1]:.1f}), ours median {ours[0]:.1f} ms "
          f"(mean {ours[1]:.1f}): {sdk[0] / ours[0]:.1f}x cheaper; target {TARGET_MS:g} ms "
          f"{'met' if ours[0] <= TARGET_MS else 'NOT met'} by the median; "
          f"{totals.stored_events:,} events stored by the server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
