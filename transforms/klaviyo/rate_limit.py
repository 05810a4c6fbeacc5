"""Client-side rate limiting per Klaviyo endpoint family, for one sender of the account.

Klaviyo counts requests per account in fixed windows: a burst window of one second and a steady
window of one minute, per endpoint family. Staying under both is cheaper than collecting 429s, so
every request first calls `RateLimiter.acquire(endpoint, deadline=...)`.

Each window is enforced as a sliding window ("at most n requests in any `seconds`-long span"),
which implies at most n in every fixed window Klaviyo may use, whatever its alignment. Klaviyo
counts a request when it arrives, which is some time after the grant (the SDK's work, a busy
CPU, the network) and at the latest when the answer comes. So a request counts from its grant
until its answer, and from then on at the time of its answer (`answered`): the next request of
a key waits a full window after that, and a request that was slow on its way cannot land in
the same window of Klaviyo's as the one after it, however long it took. (This holds for
requests sent one after another, as a key sends them; threads sharing a limiter may have
requests in flight together, which count at their grants until answered.) The span is held
1 % longer than the window: a key's grants travel between processes as wall-clock time, and
two workers' clocks differ by a few milliseconds.

Knobs:
- `limits`: per-endpoint overrides of Klaviyo's published limits.
- `scale`: all limits are `scale` times higher. It is applied by shortening the windows, so a
  test server whose clock runs `scale` times faster is matched exactly, and bursts against a
  raised-limit account stay spread out.
- `share`: the fraction of the account's limits this limiter may use. The sink builds one
  limiter per `lane/shard` key with `share = 1 / shards`: a key is processed serially wherever
  the runner puts it, so the keys together never exceed the account's limits, on one process or
  on a hundred, and they reach them when every key has work. Dividing by a worker count instead
  is wrong both ways (workers run several SDK processes; only those hosting keys send).
  Each key's share is rounded down to whole requests per window, and it must be at least one
  (`max_keys`): keys that could each send one request every other second would, without a
  common clock, sometimes all send in the same second of Klaviyo's.

A key's pacing must travel with the key: a runner moves keys between processes (FnApiRunner
with several workers does so on every bundle, Dataflow when it rebalances), and a fresh limiter
there would not know the grants just made elsewhere. `snapshot` gives the recent grants as
bytes for the key's Beam state, `restore` takes them over in whichever process the key runs
next; times travel as wall-clock time, comparable across processes (and NTP-synchronised
workers). A state the limiter itself took or took over lately is not read back: the limiter
knows all it holds, and maybe more (a bundle can fail after its requests went out; its retry
reads the state from before them).

`acquire` never waits past the caller's `deadline`, nor grants a request after it: a request
that could not be granted by then is not counted and the caller keeps it for later, so no flush
sleeps for minutes, nor starts a request once its time is over.

Every 429 pauses the endpoint for Retry-After. With every key within its share, Klaviyo has no
reason to send one; one comes when another client shares the account, or a share is set too
high. A lone 429 costs only the pause: that window was full anyway. When 429s keep coming the
limiter also halves its rate, and each success wins back a little. "Keep coming" means a 429
for a request granted after an earlier 429 that is less than a steady window old. The 429s of
requests that were in flight together count once: otherwise four threads meeting one full
window would cut the rate to a sixteenth.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, overload


class Endpoint(StrEnum):
    """The endpoint families we call; also the name used in metrics."""

    BULK_EVENTS = "bulk_events"
    PROFILE_IMPORT = "profile_import"
    BULK_PROFILE_IMPORT = "bulk_profile_import"
    IMPORT_JOBS = "import_jobs"


@dataclass(frozen=True)
class Limit:
    burst_per_second: float
    steady_per_minute: float


PUBLISHED_LIMITS: Mapping[Endpoint, Limit] = {
    Endpoint.BULK_EVENTS: Limit(10, 150),
    # The OpenAPI spec says 750/m, the generic "L" tier says 700/m: keep to the lower one.
    Endpoint.PROFILE_IMPORT: Limit(75, 700),
    Endpoint.BULK_PROFILE_IMPORT: Limit(10, 150),
    # Job status and import-error pages.
    Endpoint.IMPORT_JOBS: Limit(10, 150),
}

_CLOCK_MARGIN = 1.01  # spans held this much longer than Klaviyo's windows (module docstring)
_KNOWN_SNAPSHOTS = 8  # a key's own recent states that `restore` recognises (retried bundles)
_SLOWEST_FACTOR = 1 / 16  # never slow down below this share of the configured rate
_RECOVERY_STEP = 1 / 32  # rate share won back per successful request


class _Window:
    """At most `count` requests in any `seconds`-long span, with `count` possibly fractional."""

    def __init__(self, count: float, seconds: float) -> None:
        self._count = count
        self._seconds = seconds
        self._sent: deque[float] = deque(maxlen=max(1, math.floor(count)))

    def wait(self, now: float, factor: float) -> float:
        """Seconds until one more request fits when running at `factor` of the full rate."""
        allowed, seconds = _whole_requests(self._count * factor, self._seconds)
        if len(self._sent) < allowed:
            return 0.0
        return max(0.0, self._sent[-allowed] + seconds - now)

    def record(self, now: float) -> None:
        self._sent.append(now)

    def answered(self, granted: float, now: float) -> None:
        """The request granted at `granted` has its answer: it counts at `now` from now on."""
        try:
            self._sent.remove(granted)
        except ValueError:  # pushed out by later grants of threads sharing the limiter
            return
        bisect.insort(self._sent, now)

    def recent(self, now: float, factor: float) -> list[float]:
        """The grants still inside the window's span at `now` when running at `factor` (below
        one request per window, the span is longer than the window)."""
        _, seconds = _whole_requests(self._count * factor, self._seconds)
        return [sent for sent in self._sent if sent + seconds > now]

    def replace(self, sent: list[float]) -> None:
        self._sent.clear()
        self._sent.extend(sorted(sent))


def _whole_requests(count: float, seconds: float) -> tuple[int, float]:
    """Express "count per seconds" as whole requests without ever exceeding the rate.

    1.5 per minute becomes 1 per minute (rounding down is safe); 0.25 per second becomes
    1 per 4 seconds.
    """
    if count >= 1:
        return math.floor(count), seconds
    return 1, seconds / count


def _later_ms(seconds: float) -> float:
    """Rounded up to the millisecond: compact, and a grant never seems older than it is."""
    return math.ceil(seconds * 1000) / 1000


class _EndpointLimiter:
    def __init__(self, limit: Limit, scale: float, share: float) -> None:
        self.lock = threading.Lock()
        self.windows = (
            _Window(limit.burst_per_second * share, _CLOCK_MARGIN / scale),
            _Window(limit.steady_per_minute * share, 60.0 * _CLOCK_MARGIN / scale),
        )
        count, seconds = _whole_requests(limit.steady_per_minute * share, 60.0 / scale)
        self.allowed_per_minute = count * 60.0 / seconds  # real minutes, after rounding down
        self.factor = 1.0
        self.paused_until = -math.inf
        self.throttled_at = -math.inf  # when the latest 429 came back
        self.repeat_seconds = 60.0 / scale  # a 429 sooner than this after another one repeats it


def max_keys(limits: Mapping[Endpoint, Limit] | None = None) -> int:
    """How many keys can share these limits (merged with the published ones) with at least one
    request per window each: 10 with Klaviyo's published limits (the bulk endpoints' burst)."""
    merged = {**PUBLISHED_LIMITS, **(limits or {})}
    return math.floor(min(min(limit.burst_per_second, limit.steady_per_minute)
                          for limit in merged.values()))


class RateLimiter:
    """Blocks callers just long enough to keep each endpoint family under its share of the
    account's limits; safe to share between threads."""

    def __init__(
        self,
        limits: Mapping[Endpoint, Limit] | None = None,
        *,
        scale: float = 1.0,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if scale <= 0 or not 0 < share <= 1:
            raise ValueError(f"need scale > 0 and 0 < share <= 1, got {scale=} {share=}")
        merged = {**PUBLISHED_LIMITS, **(limits or {})}
        if share * max_keys(merged) < 1:
            raise ValueError(f"a share of {share:g} is less than one request per window of "
                             f"some endpoint: at most {max_keys(merged)} keys can share them")
        self._endpoints = {
            endpoint: _EndpointLimiter(limit, scale, share) for endpoint, limit in merged.items()
        }
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        # The snapshots this limiter took or took over lately: it knows all they hold.
        self._known: deque[bytes] = deque(maxlen=_KNOWN_SNAPSHOTS)

    @overload
    def acquire(self, endpoint: Endpoint) -> float: ...

    @overload
    def acquire(self, endpoint: Endpoint, *, deadline: float | None) -> float | None: ...

    def acquire(self, endpoint: Endpoint, *, deadline: float | None = None) -> float | None:
        """Wait until a request to `endpoint` may go out and count it.

        Returns the time it was granted at, on the limiter's clock (`throttled` needs it), or
        None, counting nothing, when it could not be granted by `deadline` (same clock): also
        when the deadline has passed already, though the windows have room.
        """
        state = self._endpoints[endpoint]
        while True:
            with state.lock:
                now = self._clock()
                wait = max(
                    0.0,
                    state.paused_until - now,
                    *(window.wait(now, state.factor) for window in state.windows),
                )
                if deadline is not None and now + wait > deadline:
                    return None
                if wait == 0:
                    for window in state.windows:
                        window.record(now)
                    return now
            self._sleep(wait)

    def answered(self, endpoint: Endpoint, granted_at: float) -> None:
        """The request `acquire` granted at `granted_at` has its answer (any answer, or a
        failure to get one): Klaviyo counted it by now, if at all, so it counts from now on
        (module docstring)."""
        state = self._endpoints[endpoint]
        with state.lock:
            now = self._clock()
            for window in state.windows:
                window.answered(granted_at, now)

    def available_in(self, endpoint: Endpoint) -> float:
        """Seconds until `acquire` could grant a request to `endpoint` (0: now); counts
        nothing."""
        state = self._endpoints[endpoint]
        with state.lock:
            now = self._clock()
            return max(0.0, state.paused_until - now,
                       *(window.wait(now, state.factor) for window in state.windows))

    def budget(self, endpoint: Endpoint) -> tuple[float, float]:
        """(requests per real minute this limiter may grant, the share of it in use now: below
        1 while it backs off after repeated 429s); the sender reports both as gauges."""
        state = self._endpoints[endpoint]
        with state.lock:
            return state.allowed_per_minute, state.factor

    def throttled(self, endpoint: Endpoint, retry_after: float | None, granted_at: float) -> None:
        """Klaviyo answered 429 to a request `acquire` granted at `granted_at`: pause the
        endpoint for Retry-After, and slow it down if 429s keep coming (module docstring)."""
        state = self._endpoints[endpoint]
        with state.lock:
            now = self._clock()
            if granted_at > state.throttled_at:  # not one of the requests in flight with it
                if now - state.throttled_at < state.repeat_seconds:
                    state.factor = max(_SLOWEST_FACTOR, state.factor / 2)
                state.throttled_at = now
            if retry_after is not None:
                state.paused_until = max(state.paused_until, now + retry_after)

    def snapshot(self) -> bytes:
        """The recent grants and back-off of every endpoint used, as compact bytes for the
        key's Beam state (module docstring); `restore` reads them in any process."""
        now = self._clock()
        to_wall = self._wall() - now
        recorded: dict[str, list[Any]] = {}
        for endpoint, state in self._endpoints.items():
            with state.lock:
                windows = [[_later_ms(t + to_wall) for t in window.recent(now, state.factor)]
                           for window in state.windows]
                paused = state.paused_until if state.paused_until > now else None
                if any(windows) or paused is not None or state.factor < 1:
                    recorded[endpoint.value] = [
                        state.factor, None if paused is None else paused + to_wall,
                        state.throttled_at + to_wall if state.throttled_at > -math.inf else None,
                        *windows]
        snapshot = json.dumps(recorded, separators=(",", ":")).encode()
        self._known.append(snapshot)
        return snapshot

    def restore(self, snapshot: bytes) -> None:
        """Continue from a `snapshot` of this key's limiter, taken in this or another process:
        its grants replace what this limiter remembers, unless this limiter took or took over
        that very snapshot lately. Then it already knows everything in it, and maybe more: a
        bundle that failed after its requests went out commits no state, and its retry reads
        the state before it, but the requests were made."""
        if snapshot in self._known:
            return
        self._known.append(snapshot)
        # The wall clock first: a process descheduled between the two readings then places
        # the grants later than they were, never earlier (snapshot reads them the other way).
        wall = self._wall()
        to_clock = self._clock() - wall
        recorded = json.loads(snapshot) if snapshot else {}
        for endpoint, state in self._endpoints.items():
            factor, paused, throttled, *windows = recorded.get(endpoint.value) or [
                1.0, None, None, *([] for _ in state.windows)]
            with state.lock:
                state.factor = float(factor)
                state.paused_until = -math.inf if paused is None else paused + to_clock
                state.throttled_at = -math.inf if throttled is None else throttled + to_clock
                for window, sent in zip(state.windows, windows, strict=True):
                    window.replace([t + to_clock for t in sent])

    def succeeded(self, endpoint: Endpoint) -> None:
        """A request got through: win back some of the rate given up after 429s."""
        state = self._endpoints[endpoint]
        with state.lock:
            state.factor = min(1.0, state.factor + _RECOVERY_STEP)
