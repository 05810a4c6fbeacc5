"""The delivery layer end to end: the real SDK over real HTTP against the local Klaviyo server.

Assertions are about outcomes, stored state and request counts, never about durations.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from tests.klaviyo_server import (
    BULK_EVENTS,
    BULK_PROFILE_IMPORT,
    IMPORT_ERRORS,
    IMPORT_JOB,
    PROFILE_IMPORT,
    Fault,
    KlaviyoTestServer,
)
from transforms.klaviyo.client import Encoded, KlaviyoClient, Response
from transforms.klaviyo.errors import (
    CallFailure,
    ErrorKind,
    KlaviyoCallError,
    KlaviyoConfigurationError,
)
from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import (
    DUPLICATE_IN_BATCH,
    DeadLetter,
    Delivered,
    ImportJob,
    KlaviyoSender,
    Outcome,
    Pending,
    expired,
)

pytest_plugins = ["tests.conftest_klaviyo"]

ROOT = "/data/attributes/events-bulk-create/data"


def soon(seconds: float = 60.0) -> float:
    """A deadline on the sender's (monotonic) clock."""
    return time.monotonic() + seconds


def settled(outcomes: list[Outcome]) -> list[Outcome]:
    """The outcomes once the caller's retry time is over: what is still pending is dead."""
    return [expired(outcome) if isinstance(outcome, Pending) else outcome for outcome in outcomes]


class RecordingMetrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.observed: dict[str, list[float]] = {}
        self.gauges: dict[str, float] = {}
        self.throttled_seconds = 0.0
        self._lock = threading.Lock()

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def throttled(self, seconds: float) -> None:
        with self._lock:
            self.throttled_seconds += seconds

    def count(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counts[name] += value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.observed.setdefault(name, []).append(value)


def make_sender(
    server: KlaviyoTestServer,
    *,
    api_key: str | None = None,
    metrics: RecordingMetrics | None = None,
    retrier: Retrier | None = None,
    limits: dict[Endpoint, Limit] | None = None,
    read_timeout: float = 5.0,
    max_events_per_request: int = 1000,
    max_request_bytes: int = 5_000_000,
    clock: FakeTime | None = None,
) -> KlaviyoSender:
    """A sender of the real SDK to the test server; with `clock`, limiter and retrier wait on
    that fake clock (the HTTP stays real)."""
    client = KlaviyoClient(
        api_key or server.api_key, test_host=server.url, read_timeout=read_timeout
    )
    if clock is None:
        limiter = RateLimiter(limits, scale=server.time_scale)
        retrier = retrier or Retrier(
            RetryPolicy(first_backoff_seconds=0.01, max_backoff_seconds=0.05)
        )
    else:
        limiter = RateLimiter(limits, scale=server.time_scale, clock=clock, sleep=clock.sleep)
        retrier = retrier or clock.retrier(0.01, 0.05)
    return KlaviyoSender(
        client,
        limiter,
        retrier,
        metrics,
        max_events_per_request=max_events_per_request,
        max_request_bytes=max_request_bytes,
    )


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def retrier(self, first: float, most: float) -> Retrier:
        policy = RetryPolicy(first_backoff_seconds=first, max_backoff_seconds=most)
        return Retrier(policy, clock=self, sleep=self.sleep, rand=lambda: 1.0)


def event_call(
    unique_id: str | None,
    email: str = "ann@example.com",
    metric: str = "Placed Order",
    time: str = "2024-08-01T00:00:00.123Z",
    **attributes: Any,
) -> tuple[str, dict[str, Any]]:
    body = {
        "data": {
            "type": "event",
            "attributes": {
                "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
                "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
                "properties": {"source": "test"},
                "time": time,
                **({"unique_id": unique_id} if unique_id is not None else {}),
                **attributes,
            },
        }
    }
    return "create_event", body


def profile_call(**attributes: Any) -> tuple[str, dict[str, Any]]:
    return "create_or_update_profile", {"data": {"type": "profile", "attributes": attributes}}


def many_events(count: int, profiles: int = 5) -> list[tuple[str, dict[str, Any]]]:
    return [event_call(f"evt-{i}", email=f"p{i % profiles}@example.com") for i in range(count)]


def assert_stored_exactly_once(server: KlaviyoTestServer, count: int) -> None:
    stored = server.stored_unique_ids()
    assert sorted(stored, key=str) == sorted((f"evt-{i}" for i in range(count)), key=str)


# --- every valid event is stored exactly once, whatever the server does ------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault.error(500),
        Fault.error(502),
        Fault.error(503),
        Fault.error(504),
        Fault.challenge(),
        Fault.html_page(),
        Fault.drop_after_write(),
    ],
    ids=lambda fault: f"{fault.kind}{fault.status or ''}",
)
def test_events_survive_server_faults(klaviyo_server: KlaviyoTestServer, fault: Fault) -> None:
    klaviyo_server.inject(BULK_EVENTS, fault, fault)
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics).send_events(
        many_events(30), deadline=soon()
    )

    assert outcomes == [Delivered()] * 30
    assert_stored_exactly_once(klaviyo_server, 30)
    assert len(klaviyo_server.statuses(BULK_EVENTS)) == 3
    assert metrics.counts["bulk_events_retries"] == 2


def test_events_written_before_the_connection_dropped_are_not_stored_twice(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.drop_after_write(), Fault.drop_after_write())

    make_sender(klaviyo_server).send_events(many_events(30), deadline=soon())

    assert klaviyo_server.statuses(BULK_EVENTS) == [None, None, 202]
    assert klaviyo_server.events_received == 90  # Klaviyo got every event three times...
    assert_stored_exactly_once(klaviyo_server, 30)  # ...and kept each once, by unique_id


def test_a_slow_answer_times_out_and_the_retry_is_idempotent(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.slow(1.5))
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics, read_timeout=0.3).send_events(
        many_events(20), deadline=soon()
    )

    assert outcomes == [Delivered()] * 20
    assert metrics.counts["bulk_events_requests_timeout"] == 1
    assert metrics.counts["bulk_events_requests_202"] == 1
    assert klaviyo_server.events_received == 40
    assert_stored_exactly_once(klaviyo_server, 20)


def test_a_429_storm_is_waited_out(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.throttle(1), Fault.throttle(1))
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics).send_events(
        many_events(10), deadline=soon()
    )

    assert outcomes == [Delivered()] * 10
    assert klaviyo_server.statuses(BULK_EVENTS) == [429, 429, 202]
    assert metrics.counts["bulk_events_throttled"] == 2
    assert metrics.counts["bulk_events_requests_429"] == 2
    assert metrics.counts["bulk_events_retries"] == 2
    assert len(metrics.observed["bulk_events_latency_ms"]) == 3
    assert_stored_exactly_once(klaviyo_server, 10)


def test_the_servers_own_rate_limit_is_survived() -> None:
    # Real-time windows and a burst of 2 per second; the client limiter is told nothing of it.
    # Five requests span at most two windows unless they take over a second, so one gets a 429.
    with KlaviyoTestServer(time_scale=1.0) as server:
        server.rate_limits[BULK_EVENTS] = (2, 1000)
        sender = make_sender(
            server,
            max_events_per_request=2,
            limits={Endpoint.BULK_EVENTS: Limit(1000, 100_000)},
        )

        outcomes = sender.send_events(many_events(10), deadline=soon())

        assert outcomes == [Delivered()] * 10
        assert 429 in server.statuses(BULK_EVENTS)
        assert_stored_exactly_once(server, 10)


def test_threads_sharing_one_sender_deliver_everything_once(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(
        BULK_EVENTS, Fault.error(503), Fault.drop_after_write(), Fault.error(500), Fault.throttle()
    )
    sender = make_sender(klaviyo_server)
    calls = many_events(400, profiles=40)
    outcomes: list[Any] = []

    def send(part: list[tuple[str, dict[str, Any]]]) -> None:
        outcomes.extend(sender.send_events(part, deadline=soon()))

    threads = [threading.Thread(target=send, args=(calls[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes == [Delivered()] * 400
    assert_stored_exactly_once(klaviyo_server, 400)


# --- bulk requests: limits, repeats and isolating the bad entry ---------------------------------


def test_large_sends_are_split_into_requests_of_at_most_1000_events(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    outcomes = make_sender(klaviyo_server).send_events(
        many_events(2500, profiles=300), deadline=soon()
    )

    assert outcomes == [Delivered()] * 2500
    assert [entry.events for entry in klaviyo_server.log] == [1000, 1000, 500]
    assert_stored_exactly_once(klaviyo_server, 2500)


def test_requests_stay_under_the_byte_limit_on_the_wire(klaviyo_server: KlaviyoTestServer) -> None:
    calls = [
        event_call(f"evt-{i}", email=f"p{i}@example.com", properties={"note": "x" * (i % 40)})
        for i in range(300)
    ]

    make_sender(klaviyo_server, max_request_bytes=30_000).send_events(calls, deadline=soon())

    assert len(klaviyo_server.log) > 1
    assert all(entry.size < 30_000 for entry in klaviyo_server.log)
    assert_stored_exactly_once(klaviyo_server, 300)


def test_repeats_in_a_batch_are_sent_once_and_reported_delivered(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    calls = [event_call("evt-0"), event_call("evt-1"), event_call("evt-0")]

    outcomes = make_sender(klaviyo_server).send_events(calls, deadline=soon())

    assert outcomes == [Delivered(), Delivered(), Delivered(DUPLICATE_IN_BATCH)]
    assert klaviyo_server.statuses(BULK_EVENTS) == [202]
    assert_stored_exactly_once(klaviyo_server, 2)


def test_a_rejected_entry_is_dead_lettered_and_the_rest_delivered(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    calls = many_events(6, profiles=3)
    calls[4] = event_call("evt-4", email="p1@example.com", time="1999-12-31T23:59:59Z")
    calls.append(event_call("evt-6", email="not-an-email"))
    calls.append(event_call("evt-7", email="not-an-email"))

    outcomes = make_sender(klaviyo_server).send_events(calls, deadline=soon())

    assert [type(outcome) for outcome in outcomes] == [Delivered] * 4 + [
        DeadLetter,
        Delivered,
        DeadLetter,
        DeadLetter,
    ]
    too_old = outcomes[4]
    assert isinstance(too_old, DeadLetter)
    assert too_old.failure.status == 400
    assert too_old.failure.kind is ErrorKind.PERMANENT
    assert too_old.failure.errors[0].pointer.endswith("/attributes/events/data/1/attributes/time")
    assert "after 2000" in too_old.reason
    bad_email = outcomes[6]
    assert isinstance(bad_email, DeadLetter)
    assert "Invalid email address" in bad_email.reason
    assert klaviyo_server.statuses(BULK_EVENTS) == [400, 202]
    assert sorted(klaviyo_server.stored_unique_ids(), key=str) == [
        "evt-0",
        "evt-1",
        "evt-2",
        "evt-3",
        "evt-5",
    ]


def test_an_event_the_sdk_refuses_is_isolated_too(klaviyo_server: KlaviyoTestServer) -> None:
    calls = many_events(4, profiles=2)
    calls[1] = event_call("evt-1", email="p1@example.com", value="9.99")  # must be a number

    outcomes = make_sender(klaviyo_server).send_events(calls, deadline=soon())

    assert [type(outcome) for outcome in outcomes] == [Delivered, DeadLetter, Delivered, Delivered]
    refused = outcomes[1]
    assert isinstance(refused, DeadLetter)
    assert refused.failure.label == "invalid_request"
    assert klaviyo_server.statuses(BULK_EVENTS) == [202]  # the bad body never left the process
    assert sorted(klaviyo_server.stored_unique_ids(), key=str) == ["evt-0", "evt-2", "evt-3"]


def test_a_refused_event_in_a_later_request_is_isolated_too(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    """The second and third requests are encoded ahead, on the helper thread: a refusal there
    is isolated as in the first."""
    calls = many_events(6, profiles=6)
    calls[3] = event_call("evt-3", email="p3@example.com", value="9.99")  # must be a number

    outcomes = make_sender(klaviyo_server, max_events_per_request=2).send_events(
        calls, deadline=soon())

    assert [type(outcome) for outcome in outcomes] == [Delivered] * 3 + [DeadLetter] + \
        [Delivered] * 2
    assert [entry.events for entry in klaviyo_server.log] == [2, 1, 2]
    assert sorted(klaviyo_server.stored_unique_ids(), key=str) == [
        "evt-0", "evt-1", "evt-2", "evt-4", "evt-5"]


class OverlapClient:
    """A client whose bulk events request waits (up to 10 s) for the next request to be
    encoded, if `batches` has one, and records what happened in which order."""

    def __init__(self, batches: int) -> None:
        self.log: list[tuple[str, int, str]] = []
        self._batches = batches  # a request waits for the next one's encoding, if there is one
        self._encoded: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, batch: int) -> threading.Event:
        with self._lock:
            return self._encoded.setdefault(batch, threading.Event())

    def encode_bulk_events(self, body: Mapping[str, Any]) -> Encoded:
        entries = body["data"]["attributes"]["events-bulk-create"]["data"]
        first = entries[0]["attributes"]["events"]["data"][0]["attributes"]["unique_id"]
        batch = int(first.removeprefix("evt-")) // 2
        self.log.append(("encode", batch, threading.current_thread().name))
        self._event(batch).set()
        return Encoded(str(batch).encode())

    def bulk_create_events(self, body: Encoded) -> Response:
        batch = int(body.payload)
        self.log.append(("send", batch, threading.current_thread().name))
        if batch + 1 < self._batches:
            self._event(batch + 1).wait(timeout=10)
        self.log.append(("answered", batch, threading.current_thread().name))
        return Response(202, {})


def test_nothing_is_planned_or_encoded_when_no_request_can_go_before_the_deadline() -> None:
    client = OverlapClient(batches=1)
    clock = FakeTime()
    limiter = RateLimiter({Endpoint.BULK_EVENTS: Limit(1, 1)}, clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05),  # type: ignore[arg-type]
                           max_events_per_request=2)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(2)]
    assert sender.send_events(calls, deadline=clock() + 5) == [Delivered()] * 2  # the minute's one

    outcomes = sender.send_events(calls, deadline=clock() + 5)

    assert outcomes == [Pending(None)] * 2
    assert [what for what, _, _ in client.log] == ["encode", "send", "answered"]


def test_the_next_request_is_encoded_while_one_is_in_flight() -> None:
    client = OverlapClient(batches=3)
    sender = KlaviyoSender(client, RateLimiter(), Retrier(RetryPolicy()),  # type: ignore[arg-type]
                           max_events_per_request=2)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(6)]

    outcomes = sender.send_events(calls, deadline=soon())

    assert outcomes == [Delivered()] * 6
    steps = [(what, batch) for what, batch, _ in client.log]
    # Requests in order, one at a time; each next one encoded before the one in flight ends.
    assert [step for step in steps if step[0] != "encode"] == [
        ("send", 0), ("answered", 0), ("send", 1), ("answered", 1), ("send", 2), ("answered", 2)]
    for batch in (1, 2):
        assert steps.index(("encode", batch)) < steps.index(("answered", batch - 1))
    assert [name.startswith("sink-encode") for what, batch, name in client.log
            if what == "encode" and batch > 0] == [True, True]


class LoggingLimiter(RateLimiter):
    """A limiter that writes each grant into a client's log."""

    def __init__(self, log: list[tuple[str, int, str]]) -> None:
        super().__init__()
        self.log = log

    def acquire(self, endpoint: Endpoint, *, deadline: float) -> float | None:
        granted = super().acquire(endpoint, deadline=deadline)
        self.log.append(("granted", -1, threading.current_thread().name))
        return granted


class SlowFirstEncodingClient(OverlapClient):
    """An OverlapClient whose first encoding takes a while (a big body on a busy CPU)."""

    def encode_bulk_events(self, body: Mapping[str, Any]) -> Encoded:
        encoded = super().encode_bulk_events(body)
        if encoded.payload == b"0":
            time.sleep(0.1)
        return encoded


def test_the_next_request_is_encoded_only_once_the_one_before_is_granted() -> None:
    """Encoding ahead starts when the request before goes, not before: at the end of a batch
    job every key prepares its first request at once, and the keys' second encodings must not
    hold up the first requests (bench/pipeline_throughput.py)."""
    client = SlowFirstEncodingClient(batches=3)
    sender = KlaviyoSender(client, LoggingLimiter(client.log),  # type: ignore[arg-type]
                           Retrier(RetryPolicy()), max_events_per_request=2)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(6)]

    assert sender.send_events(calls, deadline=soon()) == [Delivered()] * 6

    steps = [what if what != "encode" else f"encode {batch}" for what, batch, _ in client.log]
    grants = [index for index, step in enumerate(steps) if step == "granted"]
    assert len(grants) == 3
    assert steps.index("encode 1") > grants[0]
    assert steps.index("encode 2") > grants[1]


class SlowRoadClient:
    """A client on a fake clock whose requests spend a while on their way to Klaviyo, a
    different while each time (a busy CPU, the network), before they arrive and are counted."""

    def __init__(self, clock: FakeTime, delays: list[float]) -> None:
        self.clock = clock
        self.delays = delays
        self.arrivals: list[float] = []

    def encode_bulk_events(self, body: Mapping[str, Any]) -> Encoded:
        return Encoded(b"{}")

    def bulk_create_events(self, body: Encoded) -> Response:
        self.clock.sleep(self.delays[len(self.arrivals) % len(self.delays)])
        self.arrivals.append(self.clock.now)
        return Response(202, {})


def test_requests_slow_to_arrive_still_keep_every_window_of_klaviyos() -> None:
    """The limiter counts a request until its answer: a request that took long to arrive must
    not land in the same fixed window of Klaviyo's as the next one, sent on time."""
    clock = FakeTime()
    client = SlowRoadClient(clock, delays=[0.0, 0.995, 0.0, 0.3, 0.999, 0.1])
    limiter = RateLimiter({Endpoint.BULK_EVENTS: Limit(1, 20)}, clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05),  # type: ignore[arg-type]
                           max_events_per_request=1)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(60)]

    outcomes = sender.send_events(calls, deadline=clock() + 600)

    assert outcomes == [Delivered()] * 60
    per_second = Counter(int(arrival) for arrival in client.arrivals)
    per_minute = Counter(int(arrival // 60) for arrival in client.arrivals)
    assert max(per_second.values()) == 1, sorted(per_second.items())
    assert max(per_minute.values()) <= 20, sorted(per_minute.items())


class BrokenAnswerClient(SlowRoadClient):
    """Its request arrives after a while, then the answer breaks the client in a way no
    `KlaviyoCallError` describes (a bug, an SDK surprise): the exception propagates."""

    def bulk_create_events(self, body: Encoded) -> Response:
        super().bulk_create_events(body)
        self.clock.sleep(0.2)
        raise RuntimeError("the SDK choked on the answer")


def test_a_request_whose_answer_raises_still_counts_until_that_moment() -> None:
    """Whatever ends an attempt, the limiter hears of it: a request that arrived late and then
    raised something unexpected must not leave its window at its grant time."""
    clock = FakeTime()
    client = BrokenAnswerClient(clock, delays=[0.7])
    limiter = RateLimiter({Endpoint.BULK_EVENTS: Limit(1, 20)}, clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05),  # type: ignore[arg-type]
                           max_events_per_request=1)

    with pytest.raises(RuntimeError):
        sender.send_events([event_call("evt-1")], deadline=clock() + 60)
    granted_at = limiter.acquire(Endpoint.BULK_EVENTS)

    assert client.arrivals == [0.7]
    assert granted_at >= 0.9 + 1.0  # a window after the answer (0.9), not after the grant (0)


class SlowJobClient:
    """An import job whose status answer comes back late, and whose import errors are asked
    for next; logs when each request starts."""

    def __init__(self, clock: FakeTime, status_takes: float) -> None:
        self.clock = clock
        self.status_takes = status_takes
        self.started: list[tuple[str, float]] = []

    def get_bulk_import_job(self, job_id: str) -> Response:
        self.started.append(("status", self.clock.now))
        self.clock.sleep(self.status_takes)
        return Response(200, {"data": {"attributes": {"status": "complete"}}})

    def get_import_errors(self, job_id: str, page_cursor: str | None = None) -> Response:
        self.started.append(("errors", self.clock.now))
        return Response(200, {"data": []})


def test_no_request_of_a_poll_starts_after_the_deadline() -> None:
    """The job's status came back after the flush's deadline: its import errors are asked for
    in a later poll, not now (the limiter had room, but the flush's time was over)."""
    clock = FakeTime()
    client = SlowJobClient(clock, status_takes=3.0)
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05))  # type: ignore[arg-type]
    calls = [profile_call(email="ann@example.com")]

    polled = sender.poll_profile_import(ImportJob("job-1", 1), calls, deadline=clock() + 2)

    assert polled is None  # ask again later
    assert client.started == [("status", 0.0)]


def test_a_repeat_of_a_dead_lettered_event_shares_its_fate(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    bad = event_call("evt-0", time="1999-01-01T00:00:00Z")

    outcomes = make_sender(klaviyo_server).send_events([bad, bad], deadline=soon())

    assert all(isinstance(outcome, DeadLetter) for outcome in outcomes)
    assert isinstance(outcomes[1], DeadLetter)
    assert outcomes[1].reason.startswith(DUPLICATE_IN_BATCH)


# --- retry deadline ----------------------------------------------------------------------------


def test_retries_use_the_time_up_to_the_deadline_then_the_calls_are_pending(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    """An outage (every request 503): the request is retried, split without evidence of health
    at most twice, and every part is retried until a last attempt at the deadline."""
    klaviyo_server.inject(BULK_EVENTS, *[Fault.error(503)] * 30)
    fake = FakeTime()  # the waits are simulated, the HTTP is real
    sender = make_sender(klaviyo_server, retrier=fake.retrier(1, 8), clock=fake)

    outcomes = sender.send_events(many_events(3), deadline=10.0)

    # whole: 0, 1, 3 → halves of 1 and 2 events: 3, 4, 6 → the 2-event half split at 6;
    # every part: 6 or 7, 9, and 10 (the deadline)
    assert klaviyo_server.statuses(BULK_EVENTS) == [503] * 18
    assert fake.now == 10.0
    assert all(isinstance(outcome, Pending) for outcome in outcomes)
    dead = settled(outcomes)[0]
    assert isinstance(dead, DeadLetter)
    assert (dead.failure.kind, dead.failure.status) == (ErrorKind.TRANSIENT, 503)
    assert dead.reason.startswith("not delivered before the deadline (503)")
    assert klaviyo_server.stored_unique_ids() == []


def test_no_attempt_starts_after_the_deadline(klaviyo_server: KlaviyoTestServer) -> None:
    fake = FakeTime()
    sender = make_sender(klaviyo_server, retrier=fake.retrier(1, 8), clock=fake)

    late = sender.send_events(many_events(2), deadline=-1.0)
    no_room = make_sender(klaviyo_server, limits={Endpoint.PROFILE_IMPORT: Limit(1, 1)}, clock=fake)
    first = no_room.send_profile(profile_call(email="a@example.com"), deadline=0.5)
    second = no_room.send_profile(profile_call(email="b@example.com"), deadline=0.5)

    assert late == [Pending(None)] * 2
    assert (first, second) == (Delivered(), Pending(None))  # the limiter had no room in time
    assert fake.now == 0.0  # and nobody slept for it
    assert klaviyo_server.statuses(BULK_EVENTS) == []
    assert settled([second])[0] == expired(Pending(None))


def test_waiting_is_reported_as_throttling(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.error(503), Fault.error(503))
    fake = FakeTime()
    metrics = RecordingMetrics()
    limits = {Endpoint.BULK_EVENTS: Limit(1, 60)}
    sender = make_sender(
        klaviyo_server, metrics=metrics, retrier=fake.retrier(1, 8), limits=limits, clock=fake
    )

    outcomes = sender.send_events(many_events(2), deadline=60.0)

    assert outcomes == [Delivered()] * 2
    # backoffs of 1 and 2 s; the limiter (1 per 1/60 s... scaled) adds its own waits
    assert metrics.throttled_seconds == fake.now
    assert fake.now >= 3.0
    assert metrics.counts["bulk_events_granted"] == 3
    assert metrics.gauges["bulk_events_allowed_per_minute"] == 60 * klaviyo_server.time_scale
    assert metrics.gauges["bulk_events_rate_percent"] == 100


# --- one bad payload never takes its batch -----------------------------------------------------


def real_time_sender(
    server: KlaviyoTestServer, metrics: RecordingMetrics | None = None
) -> KlaviyoSender:
    """Bisection sends many requests quickly: pace them on the real clock the server counts on."""
    retrier = Retrier(RetryPolicy(first_backoff_seconds=0.1, max_backoff_seconds=0.5))
    return make_sender(server, metrics=metrics, retrier=retrier)


def test_a_poison_payload_among_300_events_is_isolated(klaviyo_server: KlaviyoTestServer) -> None:
    """Klaviyo answers 500 to any request carrying evt-137: bisection finds it; every other
    event is delivered, and only it ends pending (and is dead-lettered when time is up)."""
    klaviyo_server.poison("evt-137")
    metrics = RecordingMetrics()
    sender = real_time_sender(klaviyo_server, metrics)

    outcomes = settled(sender.send_events(many_events(300, profiles=40), deadline=soon(1.5)))

    assert [i for i, outcome in enumerate(outcomes) if not isinstance(outcome, Delivered)] == [137]
    poison = outcomes[137]
    assert isinstance(poison, DeadLetter)
    assert poison.failure.status == 500
    assert len(klaviyo_server.stored_unique_ids()) == 299
    assert metrics.counts["bulk_events_splits"] <= 10  # log2(300) levels, one split each
    assert 429 not in klaviyo_server.statuses(BULK_EVENTS)


def test_two_poisons_in_one_request_are_both_isolated(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.poison("evt-3", "evt-250")  # one in each half of the first split

    outcomes = real_time_sender(klaviyo_server).send_events(
        many_events(300, profiles=40), deadline=soon(3)
    )

    assert [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Pending)] == [3, 250]
    assert len(klaviyo_server.stored_unique_ids()) == 298


def test_an_outage_is_not_bisected_into_many_requests(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, *[Fault.error(500)] * 100)
    fake = FakeTime()
    metrics = RecordingMetrics()
    sender = make_sender(klaviyo_server, metrics=metrics, retrier=fake.retrier(0.5, 4), clock=fake)

    outcomes = sender.send_events(many_events(1000, profiles=100), deadline=30.0)

    assert all(isinstance(outcome, Pending) for outcome in outcomes)
    assert metrics.counts["bulk_events_splits"] == 2  # then three parts back off together
    assert len(klaviyo_server.statuses(BULK_EVENTS)) < 40  # three parts, ~12 attempts each


# --- one retry layer ---------------------------------------------------------------------------


def test_urllib3_does_not_retry_underneath(klaviyo_server: KlaviyoTestServer) -> None:
    """A dropped connection on a GET (which urllib3's default Retry(3) would resend unseen) is
    one request on the server and one counted attempt here."""
    metrics = RecordingMetrics()
    sender = make_sender(klaviyo_server, metrics=metrics)
    ((job, indexes),) = sender.start_profile_import(
        [profile_call(email="ann@example.com")], deadline=soon()
    )[0]
    klaviyo_server.inject(IMPORT_JOB, Fault.drop_after_write())

    polled = sender.poll_profile_import(
        job, [profile_call(email="ann@example.com")], deadline=soon()
    )

    assert indexes == [0]
    assert isinstance(polled, list) and isinstance(polled[0], Pending)
    assert polled[0].failure is not None and polled[0].failure.label == "connection"
    assert klaviyo_server.statuses(IMPORT_JOB) == [None]
    assert metrics.counts["import_jobs_requests_connection"] == 1
    assert sender._client._sdk.configuration.retries.total == 0


# --- configuration errors stop the job ---------------------------------------------------------


def test_a_wrong_key_raises_the_configuration_error(klaviyo_server: KlaviyoTestServer) -> None:
    sender = make_sender(klaviyo_server, api_key="pk_wrong")

    with pytest.raises(KlaviyoConfigurationError, match="401"):
        sender.send_events(many_events(2), deadline=soon())
    with pytest.raises(KlaviyoConfigurationError, match="401"):
        sender.send_profile(profile_call(email="ann@example.com"), deadline=soon())
    assert klaviyo_server.statuses(BULK_EVENTS) == [401]  # not retried


def test_a_json_403_raises_the_configuration_error(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(PROFILE_IMPORT, Fault.forbidden())

    with pytest.raises(KlaviyoConfigurationError, match="permission"):
        make_sender(klaviyo_server).send_profile(
            profile_call(email="ann@example.com"), deadline=soon()
        )


# --- profiles ----------------------------------------------------------------------------------


def test_profile_upserts_create_then_update(klaviyo_server: KlaviyoTestServer) -> None:
    metrics = RecordingMetrics()
    sender = make_sender(klaviyo_server, metrics=metrics)
    klaviyo_server.inject(PROFILE_IMPORT, Fault.error(502), Fault.drop_after_write())

    first = sender.send_profile(
        profile_call(email="ann@example.com", first_name="Ann", title="CTO"), deadline=soon()
    )
    second = sender.send_profile(
        profile_call(email="ann@example.com", title=None, properties={"tier": "gold"}),
        deadline=soon(),
    )

    assert (first, second) == (Delivered(), Delivered())
    assert klaviyo_server.profile(email="ann@example.com") == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "properties": {"tier": "gold"},
    }
    assert klaviyo_server.statuses(PROFILE_IMPORT) == [502, None, 200, 200]
    assert metrics.counts["profile_import_requests_200"] == 2


def test_profile_conflicts_and_bad_data_are_dead_lettered(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    sender = make_sender(klaviyo_server)
    sender.send_profile(profile_call(email="ann@example.com"), deadline=soon())
    sender.send_profile(profile_call(external_id="user-2"), deadline=soon())

    conflict = sender.send_profile(
        profile_call(email="ann@example.com", external_id="user-2"), deadline=soon()
    )
    invalid = sender.send_profile(profile_call(email="ann-at-example.com"), deadline=soon())

    assert isinstance(conflict, DeadLetter)
    assert conflict.failure.status == 409
    assert conflict.failure.errors[0].meta["duplicate_profile_id"]
    assert isinstance(invalid, DeadLetter)
    assert invalid.failure.errors[0].pointer == "/data/attributes/email"


def test_bulk_profile_import_is_started_then_polled_and_maps_its_errors_back(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    good = [profile_call(email=f"p{i}@example.com", first_name="P") for i in range(20)]
    bad = [profile_call(email=f"bad-{i}") for i in range(130)]  # more than one page of errors
    calls = [call for pair in zip(good, bad[:20], strict=True) for call in pair] + bad[20:]
    klaviyo_server.inject(BULK_PROFILE_IMPORT, Fault.error(503))
    klaviyo_server.inject(IMPORT_JOB, Fault.error(500))
    sender = make_sender(klaviyo_server)

    jobs, outcomes = sender.start_profile_import(calls, deadline=soon())
    ((job, indexes),) = jobs
    job_calls = [calls[index] for index in indexes]
    polls = [sender.poll_profile_import(job, job_calls, deadline=soon()) for _ in range(3)]

    assert outcomes == {}
    assert indexes == list(range(150))
    assert ImportJob.from_json(job.to_json()) == job
    failed_poll, running, done = polls
    assert failed_poll is not None and all(isinstance(o, Pending) for o in failed_poll)
    assert running is None
    assert done is not None
    delivered = [i for i, outcome in enumerate(done) if isinstance(outcome, Delivered)]
    assert delivered == list(range(0, 40, 2))
    failed = done[1]
    assert isinstance(failed, DeadLetter)
    assert "Invalid email address" in failed.reason
    assert klaviyo_server.profile(email="p7@example.com") == {
        "email": "p7@example.com",
        "first_name": "P",
    }
    assert klaviyo_server.statuses(BULK_PROFILE_IMPORT) == [503, 202]
    assert klaviyo_server.statuses(IMPORT_JOB) == [500, 200, 200]
    assert klaviyo_server.statuses(IMPORT_ERRORS) == [200, 200]


def test_a_page_that_is_not_klaviyos_answer_is_a_transient_failure_on_every_endpoint(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    """A 200 with an HTML page (a proxy, a captive portal) is not Klaviyo's answer: nothing was
    stored, so it is retried like a 5xx on every endpoint, never taken for a success nor
    crashing the flush (the SDK's response handling raised AttributeError on such a body, and
    a bulk events or import request took it as accepted)."""
    for route in (BULK_EVENTS, PROFILE_IMPORT, BULK_PROFILE_IMPORT, IMPORT_JOB, IMPORT_ERRORS):
        klaviyo_server.inject(route, Fault.html_page())
    metrics = RecordingMetrics()
    sender = make_sender(klaviyo_server, metrics=metrics)

    events = sender.send_events(many_events(3), deadline=soon())
    profile = sender.send_profile(profile_call(email="ann@example.com"), deadline=soon())
    imports = [profile_call(email="bea@example.com"), profile_call(email="bad-address")]
    jobs, outcomes = sender.start_profile_import(imports, deadline=soon())
    ((job, indexes),) = jobs
    polls = [sender.poll_profile_import(job, [imports[i] for i in indexes], deadline=soon())
             for _ in range(4)]

    assert events == [Delivered()] * 3
    assert_stored_exactly_once(klaviyo_server, 3)
    assert profile == Delivered()
    assert klaviyo_server.profile(email="ann@example.com") == {"email": "ann@example.com"}
    assert outcomes == {}
    job_page, running, errors_page, done = polls  # a page instead of the job, of its errors
    assert job_page is not None and all(isinstance(o, Pending) for o in job_page)
    assert running is None
    assert errors_page is not None and all(isinstance(o, Pending) for o in errors_page)
    assert done is not None and done[0] == Delivered() and isinstance(done[1], DeadLetter)
    for route in (BULK_EVENTS, PROFILE_IMPORT, BULK_PROFILE_IMPORT, IMPORT_JOB, IMPORT_ERRORS):
        assert klaviyo_server.statuses(route)[0] == 200  # the page, then the real answers
    assert metrics.counts["bulk_events_requests_unexpected_response"] == 1
    assert metrics.counts["profile_import_requests_unexpected_response"] == 1


def test_a_page_that_keeps_coming_dead_letters_with_what_it_was(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(PROFILE_IMPORT, *[Fault.html_page()] * 10)
    fake = FakeTime()
    sender = make_sender(klaviyo_server, retrier=fake.retrier(1, 1), clock=fake)

    outcome = sender.send_profile(profile_call(email="ann@example.com"), deadline=2.0)

    assert isinstance(outcome, Pending)
    assert outcome.failure is not None
    assert outcome.failure.label == "unexpected_response"
    assert "text/html" in outcome.failure.summary
    assert "not an answer of the Klaviyo API" in outcome.failure.summary


def test_an_import_job_not_submitted_in_time_is_pending(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_PROFILE_IMPORT, *[Fault.error(503)] * 10)
    fake = FakeTime()
    sender = make_sender(klaviyo_server, retrier=fake.retrier(1, 1), clock=fake)

    jobs, outcomes = sender.start_profile_import(
        [profile_call(email="ann@example.com")], deadline=2.0
    )

    assert jobs == []
    assert isinstance(outcomes[0], Pending)
    assert klaviyo_server.statuses(BULK_PROFILE_IMPORT) == [503] * 3  # at 0, 1 and 2


# --- the API key never leaks -------------------------------------------------------------------

SECRET = "pk_SECRET_d41d8cd98f00b204e980"


def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 and the SDK log at DEBUG
    seen: list[str] = []
    fake = FakeTime()
    with KlaviyoTestServer(api_key=SECRET, time_scale=60.0) as server:

        def sender(**options: Any) -> KlaviyoSender:
            return make_sender(
                server, api_key=SECRET, retrier=fake.retrier(0.5, 1), clock=fake, **options
            )

        def send(calls: list[tuple[str, dict[str, Any]]]) -> None:
            seen.extend(
                map(
                    repr,
                    settled(sender(read_timeout=0.2).send_events(calls, deadline=fake.now + 2)),
                )
            )

        refused = sender()  # used once the server stopped
        # One event (nothing to split): attempts at 0, 0.5, 1.5 and the deadline 2.
        server.inject(BULK_EVENTS, *[Fault.error(500)] * 4, *[Fault.slow(0.5)] * 4)
        send(many_events(1))  # 500s until the deadline
        send(many_events(1))  # timeouts until the deadline
        send([event_call("evt-x", time="not a time")])
        seen.append(repr(sender().send_profile(profile_call(email="bad"), deadline=fake.now + 2)))
        server.inject(PROFILE_IMPORT, Fault.forbidden())
        try:
            sender().send_profile(profile_call(email="ann@example.com"), deadline=fake.now + 2)
        except KlaviyoConfigurationError as exc:
            seen.append("".join(traceback.format_exception(exc)))
        seen += [repr(refused), repr(refused._client)]
    seen += map(repr, settled(refused.send_events(many_events(1), deadline=fake.now + 2)))

    assert len(seen) >= 8
    assert any("DeadLetter" in text for text in seen)
    assert any("KlaviyoConfigurationError" in text for text in seen)
    assert "retrying" in caplog.text
    for text in [*seen, caplog.text]:
        assert SECRET not in text


class FakeClockClient:
    """Bulk events on a fake clock: each request takes `took` seconds of it, batch 0's first
    attempt may be throttled (429); every encoding is logged with its thread."""

    def __init__(self, clock: FakeTime, took: float, throttle_first: bool = False) -> None:
        self.clock = clock
        self.took = took
        self.throttle_first = throttle_first
        self.log: list[tuple[str, int, str]] = []

    def encode_bulk_events(self, body: Mapping[str, Any]) -> Encoded:
        entries = body["data"]["attributes"]["events-bulk-create"]["data"]
        first = entries[0]["attributes"]["events"]["data"][0]["attributes"]["unique_id"]
        batch = int(first.removeprefix("evt-")) // 2
        self.log.append(("encode", batch, threading.current_thread().name))
        return Encoded(str(batch).encode())

    def bulk_create_events(self, body: Encoded) -> Response:
        batch = int(body.payload)
        self.log.append(("send", batch, threading.current_thread().name))
        self.clock.now += self.took
        if self.throttle_first:
            self.throttle_first = False
            raise KlaviyoCallError(CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429,
                                               retry_after=1.0))
        return Response(202, {})


def _encode_threads_end(before: set[threading.Thread]) -> bool:
    """Whether every helper thread of an encoding ahead started since `before` has ended (they
    end on their own once their send closed them; up to 5 s for that)."""
    for _ in range(500):
        if not any(thread.name.startswith("sink-encode")
                   for thread in set(threading.enumerate()) - before):
            return True
        time.sleep(0.01)
    return False


def test_once_the_deadline_passes_between_batches_nothing_more_is_encoded() -> None:
    """Batch 0's request ends after the deadline: batch 1 was encoded at its grant (before the
    deadline), batch 2 never is; the rest is Pending, and the helper thread ends."""
    clock = FakeTime()
    client = FakeClockClient(clock, took=100.0)
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05),  # type: ignore[arg-type]
                           max_events_per_request=2)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(6)]
    before = set(threading.enumerate())

    outcomes = sender.send_events(calls, deadline=clock() + 50)

    assert outcomes[:2] == [Delivered()] * 2
    assert [type(outcome) for outcome in outcomes[2:]] == [Pending] * 4
    assert [(what, batch) for what, batch, _ in client.log] == [
        ("encode", 0), ("encode", 1), ("send", 0)] or [
        (what, batch) for what, batch, _ in client.log] == [
        ("encode", 0), ("send", 0), ("encode", 1)]
    assert _encode_threads_end(before)


def test_a_retried_request_encodes_the_next_one_once() -> None:
    """Batch 0 is granted twice (a 429, then its retry): batch 1 is encoded once, ahead, and
    every call is delivered."""
    clock = FakeTime()
    client = FakeClockClient(clock, took=0.1, throttle_first=True)
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    sender = KlaviyoSender(client, limiter, clock.retrier(0.01, 0.05),  # type: ignore[arg-type]
                           max_events_per_request=2)
    calls = [event_call(f"evt-{i}", email=f"p{i}@example.com") for i in range(6)]
    before = set(threading.enumerate())

    assert sender.send_events(calls, deadline=clock() + 600) == [Delivered()] * 6

    encodings = Counter(batch for what, batch, _ in client.log if what == "encode")
    assert encodings == {0: 1, 1: 1, 2: 1}
    assert [batch for what, batch, _ in client.log if what == "send"] == [0, 0, 1, 2]
    assert _encode_threads_end(before)
