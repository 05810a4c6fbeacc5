"""Property: the `shard/N` keys of one account never put more than Klaviyo's limit into any of
its fixed windows, whatever the time between a request's grant, its arrival and its answer.

Each key is simulated on its own fake timeline (the keys' limiters share nothing, so their
timelines only meet in the arrivals at Klaviyo). A key's flushes go through the real
`KlaviyoSender` and `RateLimiter` with a fake client whose requests spend random times on their
way and on the answer's way back, fail in the ways a real call fails (refused before sending,
5xx, timeouts, 429s of another client, connection errors before arriving) and hop between
processes between flushes (`snapshot`/`restore`, unrelated monotonic clocks, wall clocks a few
milliseconds apart, a process descheduled while it reads its clocks). The arrivals of all keys
are then counted as tests/klaviyo_server.py counts them: fixed windows of 1 and 60 Klaviyo
seconds, here at every alignment (the most in any half-open span of the window's length).
Along the way, every flush keeps to its deadline: no request starts after it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_klaviyo_delivery import event_call, profile_call
from tests.test_klaviyo_rate_limit import most_in_any_window
from transforms.klaviyo.client import Encoded, Response
from transforms.klaviyo.errors import CallFailure, ErrorKind, KlaviyoCallError
from transforms.klaviyo.rate_limit import PUBLISHED_LIMITS, Endpoint, RateLimiter, max_keys
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import ImportJob, KlaviyoSender

WALL_EPOCH = 1_700_000_000.0
PREEMPT = 0.5  # the longest a process is descheduled while reading its clocks, in windows


class Timeline:
    """One key's true time, moved only by sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        if seconds > 0:  # a real sleep takes at least a microsecond: a fake clock must move
            self.now += max(seconds, 1e-6)


class Process:
    """A process a key runs in: its own monotonic origin, its wall clock a little off, and now
    and then descheduled while it reads the wall clock."""

    def __init__(self, timeline: Timeline, rng: random.Random, window: float) -> None:
        self.timeline = timeline
        self.rng = rng
        self.origin = rng.uniform(-1000, 1000)
        self.skew = rng.uniform(-0.004, 0.004) * window  # NTP: well inside the 1 % margin
        self.preempt = PREEMPT * window

    def clock(self) -> float:
        return self.timeline.now + self.origin

    def wall(self) -> float:
        if self.rng.random() < 0.2:  # descheduled between reading one clock and the other
            self.timeline.sleep(self.rng.uniform(0, self.preempt))
        return WALL_EPOCH + self.timeline.now + self.skew


def _transient(label: str) -> KlaviyoCallError:
    return KlaviyoCallError(CallFailure(ErrorKind.TRANSIENT, label, label))


class RoadClient:
    """A fake client on a key's timeline: every request that reaches Klaviyo is logged, with its
    endpoint, at the true time it arrives."""

    def __init__(self, timeline: Timeline, rng: random.Random, unit: float,
                 arrivals: list[tuple[Endpoint, float]]) -> None:
        self.timeline = timeline
        self.rng = rng
        self.unit = unit  # one Klaviyo second in the key's seconds (1 / scale)
        self.arrivals = arrivals
        self.jobs = 0
        self.deadline = 0.0  # the current flush's deadline, in true time
        self.late: list[float] = []  # requests started after their flush's deadline
        self.answered = 0.0  # when the latest request ended

    def _delay(self, most: float) -> float:
        rng = self.rng
        roll = rng.random()
        if roll < 0.3:
            return 0.0
        if roll < 0.9:
            return rng.uniform(0, 0.1 * most) * self.unit
        return rng.uniform(0, most) * self.unit

    def _request(self, endpoint: Endpoint) -> None:
        """The fate of one request, up to its answer; raises its failure."""
        timeline = self.timeline
        if timeline.now > self.deadline + 1e-9:  # (the deadline was converted: float error)
            self.late.append(timeline.now - self.deadline)
        try:
            self._fate(endpoint)
        finally:
            self.answered = timeline.now

    def _fate(self, endpoint: Endpoint) -> None:
        rng, timeline = self.rng, self.timeline
        roll = rng.random()
        if roll < 0.04:  # refused by the SDK's model before sending (profile-import validates)
            raise KlaviyoCallError(CallFailure(ErrorKind.PERMANENT, "invalid_request", "bad"))
        if roll < 0.08:  # connection refused: it never arrives
            timeline.sleep(self._delay(0.5))
            raise _transient("connection")
        timeline.sleep(self._delay(1.5))  # on its way (the SDK, a busy CPU, the network)
        self.arrivals.append((endpoint, timeline.now))
        timeline.sleep(self._delay(0.8))  # the answer on its way back
        roll = rng.random()
        if roll < 0.08:
            raise KlaviyoCallError(CallFailure(ErrorKind.TRANSIENT, "503", "HTTP 503", 503))
        if roll < 0.11:
            timeline.sleep(rng.uniform(0, 5) * self.unit)  # no answer: the read timeout
            raise _transient("timeout")
        if roll < 0.13:  # another client on the account filled a window
            raise KlaviyoCallError(CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429,
                                               retry_after=rng.choice([None, 0.0, 1.0])))

    def encode_bulk_events(self, body: Mapping[str, Any]) -> Encoded:
        return Encoded(b"{}")

    def bulk_create_events(self, body: Encoded) -> Response:
        self._request(Endpoint.BULK_EVENTS)
        return Response(202, {})

    def create_or_update_profile(self, body: Mapping[str, Any]) -> Response:
        self._request(Endpoint.PROFILE_IMPORT)
        return Response(200, {})

    def encode_bulk_import(self, body: Mapping[str, Any]) -> Encoded:
        return Encoded(b"{}")

    def bulk_import_profiles(self, body: Encoded) -> Response:
        self._request(Endpoint.BULK_PROFILE_IMPORT)
        self.jobs += 1
        return Response(202, {"data": {"id": f"job-{self.jobs}"}})

    def get_bulk_import_job(self, job_id: str) -> Response:
        self._request(Endpoint.IMPORT_JOBS)
        status = self.rng.choice(["processing", "complete", "complete"])
        return Response(200, {"data": {"attributes": {"status": status}}})

    def get_import_errors(self, job_id: str, page_cursor: str | None = None) -> Response:
        self._request(Endpoint.IMPORT_JOBS)
        more = self.rng.random() < 0.5
        links = {"next": "https://a.klaviyo.com/api/x?page[cursor]=c"} if more else {}
        return Response(200, {"data": [], "links": links})


def run_key(rng: random.Random, shards: int, scale: float, flushes: int,
            arrivals: list[tuple[Endpoint, float]]) -> None:
    """One key's flushes, hopping between processes, on its own timeline."""
    unit = 1 / scale
    timeline = Timeline()
    client = RoadClient(timeline, rng, unit, arrivals)
    pacing = b""
    jobs: list[tuple[ImportJob, list[tuple[str, dict[str, Any]]]]] = []
    sender: KlaviyoSender | None = None
    limiter: RateLimiter | None = None
    process: Process | None = None
    for flush in range(flushes):
        if sender is None or rng.random() < 0.3:  # the runner moves the key
            process = Process(timeline, rng, unit)
            limiter = RateLimiter(scale=scale, share=1 / shards, clock=process.clock,
                                  sleep=timeline.sleep, wall=process.wall)
            retrier = Retrier(RetryPolicy(first_backoff_seconds=0.05 * unit,
                                          max_backoff_seconds=2 * unit),
                              clock=process.clock, sleep=timeline.sleep, rand=rng.random)
            sender = KlaviyoSender(client, limiter, retrier,  # type: ignore[arg-type]
                                   max_events_per_request=rng.choice([1, 2, 5]),
                                   max_request_bytes=rng.choice([400, 5_000_000]))
        assert limiter is not None and process is not None
        limiter.restore(pacing)
        deadline = process.clock() + rng.uniform(0.5, 15) * unit
        client.deadline = deadline - process.origin
        what = rng.random()
        if what < 0.55:
            calls = [event_call(f"evt-{flush}-{i}", email=f"p{i}@example.com")
                     for i in range(rng.randint(1, 12))]
            sender.send_events(calls, deadline=deadline)
        elif what < 0.75:
            sender.send_profile(profile_call(email=f"p{flush}@example.com"), deadline=deadline)
        elif what < 0.85 or not jobs:
            calls = [profile_call(email=f"q{flush}-{i}@example.com")
                     for i in range(rng.randint(1, 6))]
            started, _ = sender.start_profile_import(calls, deadline=deadline)
            jobs += [(job, [calls[i] for i in indexes]) for job, indexes in started]
        else:
            job, job_calls = jobs[rng.randrange(len(jobs))]
            if sender.poll_profile_import(job, job_calls, deadline=deadline) is not None:
                jobs.remove((job, job_calls))
        # No attempt starts after the deadline, and no flush outlasts it but for the request
        # that was in flight at the deadline.
        assert client.late == []
        assert timeline.now <= max(client.deadline, client.answered) + 1e-6
        pacing = limiter.snapshot()  # what the key's Beam state holds after the flush
        timeline.sleep(rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 30)]) * unit)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), shards=st.integers(1, max_keys()),
       scale=st.sampled_from([1.0, 60.0]))
def test_keys_never_exceed_a_fixed_window_of_klaviyos_whatever_the_delays(
    seed: int, shards: int, scale: float
) -> None:
    rng = random.Random(seed)
    arrivals: list[tuple[Endpoint, float]] = []
    for _ in range(shards):
        run_key(rng, shards, scale, flushes=40, arrivals=arrivals)

    assert arrivals
    for endpoint, limit in PUBLISHED_LIMITS.items():
        times = [time for sent_to, time in arrivals if sent_to is endpoint]
        if not times:
            continue
        assert most_in_any_window(times, 1 / scale) <= limit.burst_per_second, endpoint
        assert most_in_any_window(times, 60 / scale) <= limit.steady_per_minute, endpoint
