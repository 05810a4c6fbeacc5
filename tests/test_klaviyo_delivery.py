"""The delivery layer end to end: the real SDK over real HTTP against the local Klaviyo server.

Assertions are about outcomes, stored state and request counts, never about durations.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import Counter
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
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.errors import ErrorKind, KlaviyoConfigurationError
from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import DUPLICATE_IN_BATCH, DeadLetter, Delivered, KlaviyoSender

pytest_plugins = ["tests.conftest_klaviyo"]

ROOT = "/data/attributes/events-bulk-create/data"


class RecordingMetrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.observed: dict[str, list[float]] = {}
        self._lock = threading.Lock()

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
) -> KlaviyoSender:
    client = KlaviyoClient(
        api_key or server.api_key, test_host=server.url, read_timeout=read_timeout
    )
    policy = RetryPolicy(
        max_retry_seconds=30.0, first_backoff_seconds=0.01, max_backoff_seconds=0.05
    )
    return KlaviyoSender(
        client,
        RateLimiter(limits, scale=server.time_scale),
        retrier or Retrier(policy),
        metrics,
        max_events_per_request=max_events_per_request,
        max_request_bytes=max_request_bytes,
        job_poll_seconds=0.01,
    )


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
        Fault.drop_after_write(),
    ],
    ids=lambda fault: f"{fault.kind}{fault.status or ''}",
)
def test_events_survive_server_faults(klaviyo_server: KlaviyoTestServer, fault: Fault) -> None:
    klaviyo_server.inject(BULK_EVENTS, fault, fault)
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics).send_events(many_events(30))

    assert outcomes == [Delivered()] * 30
    assert_stored_exactly_once(klaviyo_server, 30)
    assert len(klaviyo_server.statuses(BULK_EVENTS)) == 3
    assert metrics.counts["bulk_events_retries"] == 2


def test_events_written_before_the_connection_dropped_are_not_stored_twice(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.drop_after_write(), Fault.drop_after_write())

    make_sender(klaviyo_server).send_events(many_events(30))

    assert klaviyo_server.statuses(BULK_EVENTS) == [None, None, 202]
    assert klaviyo_server.events_received == 90  # Klaviyo got every event three times...
    assert_stored_exactly_once(klaviyo_server, 30)  # ...and kept each once, by unique_id


def test_a_slow_answer_times_out_and_the_retry_is_idempotent(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.slow(1.5))
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics, read_timeout=0.3).send_events(
        many_events(20)
    )

    assert outcomes == [Delivered()] * 20
    assert metrics.counts["bulk_events_requests_timeout"] == 1
    assert metrics.counts["bulk_events_requests_202"] == 1
    assert klaviyo_server.events_received == 40
    assert_stored_exactly_once(klaviyo_server, 20)


def test_a_429_storm_is_waited_out(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.throttle(1), Fault.throttle(1))
    metrics = RecordingMetrics()

    outcomes = make_sender(klaviyo_server, metrics=metrics).send_events(many_events(10))

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

        outcomes = sender.send_events(many_events(10))

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
        outcomes.extend(sender.send_events(part))

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
    outcomes = make_sender(klaviyo_server).send_events(many_events(2500, profiles=300))

    assert outcomes == [Delivered()] * 2500
    assert [entry.events for entry in klaviyo_server.log] == [1000, 1000, 500]
    assert_stored_exactly_once(klaviyo_server, 2500)


def test_requests_stay_under_the_byte_limit_on_the_wire(klaviyo_server: KlaviyoTestServer) -> None:
    calls = [
        event_call(f"evt-{i}", email=f"p{i}@example.com", properties={"note": "x" * (i % 40)})
        for i in range(300)
    ]

    make_sender(klaviyo_server, max_request_bytes=30_000).send_events(calls)

    assert len(klaviyo_server.log) > 1
    assert all(entry.size < 30_000 for entry in klaviyo_server.log)
    assert_stored_exactly_once(klaviyo_server, 300)


def test_repeats_in_a_batch_are_sent_once_and_reported_delivered(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    calls = [event_call("evt-0"), event_call("evt-1"), event_call("evt-0")]

    outcomes = make_sender(klaviyo_server).send_events(calls)

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

    outcomes = make_sender(klaviyo_server).send_events(calls)

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

    outcomes = make_sender(klaviyo_server).send_events(calls)

    assert [type(outcome) for outcome in outcomes] == [Delivered, DeadLetter, Delivered, Delivered]
    refused = outcomes[1]
    assert isinstance(refused, DeadLetter)
    assert refused.failure.label == "invalid_request"
    assert klaviyo_server.statuses(BULK_EVENTS) == [202]  # the bad body never left the process
    assert sorted(klaviyo_server.stored_unique_ids(), key=str) == ["evt-0", "evt-2", "evt-3"]


def test_a_repeat_of_a_dead_lettered_event_shares_its_fate(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    bad = event_call("evt-0", time="1999-01-01T00:00:00Z")

    outcomes = make_sender(klaviyo_server).send_events([bad, bad])

    assert all(isinstance(outcome, DeadLetter) for outcome in outcomes)
    assert isinstance(outcomes[1], DeadLetter)
    assert outcomes[1].reason.startswith(DUPLICATE_IN_BATCH)


# --- retry deadline ----------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_retries_stop_at_the_deadline_with_the_last_error(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.inject(BULK_EVENTS, *[Fault.error(503)] * 20)
    fake = FakeTime()  # the retrier's waits are simulated, the HTTP is real
    policy = RetryPolicy(max_retry_seconds=10, first_backoff_seconds=1, max_backoff_seconds=8)
    retrier = Retrier(policy, clock=fake, sleep=fake.sleep, rand=lambda: 1.0)

    outcomes = make_sender(klaviyo_server, retrier=retrier).send_events(many_events(3))

    assert klaviyo_server.statuses(BULK_EVENTS) == [503] * 4  # waits 1 + 2 + 4; 8 more is late
    outcome = outcomes[0]
    assert outcomes == [outcome] * 3
    assert isinstance(outcome, DeadLetter)
    assert (outcome.failure.kind, outcome.failure.status) == (ErrorKind.TRANSIENT, 503)
    assert outcome.reason.startswith("not delivered before the deadline (503)")
    assert klaviyo_server.stored_unique_ids() == []


# --- configuration errors stop the job ---------------------------------------------------------


def test_a_wrong_key_raises_the_configuration_error(klaviyo_server: KlaviyoTestServer) -> None:
    sender = make_sender(klaviyo_server, api_key="pk_wrong")

    with pytest.raises(KlaviyoConfigurationError, match="401"):
        sender.send_events(many_events(2))
    with pytest.raises(KlaviyoConfigurationError, match="401"):
        sender.send_profile(profile_call(email="ann@example.com"))
    assert klaviyo_server.statuses(BULK_EVENTS) == [401]  # not retried


def test_a_json_403_raises_the_configuration_error(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(PROFILE_IMPORT, Fault.forbidden())

    with pytest.raises(KlaviyoConfigurationError, match="permission"):
        make_sender(klaviyo_server).send_profile(profile_call(email="ann@example.com"))


# --- profiles ----------------------------------------------------------------------------------


def test_profile_upserts_create_then_update(klaviyo_server: KlaviyoTestServer) -> None:
    metrics = RecordingMetrics()
    sender = make_sender(klaviyo_server, metrics=metrics)
    klaviyo_server.inject(PROFILE_IMPORT, Fault.error(502), Fault.drop_after_write())

    first = sender.send_profile(
        profile_call(email="ann@example.com", first_name="Ann", title="CTO")
    )
    second = sender.send_profile(
        profile_call(email="ann@example.com", title=None, properties={"tier": "gold"})
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
    sender.send_profile(profile_call(email="ann@example.com"))
    sender.send_profile(profile_call(external_id="user-2"))

    conflict = sender.send_profile(profile_call(email="ann@example.com", external_id="user-2"))
    invalid = sender.send_profile(profile_call(email="ann-at-example.com"))

    assert isinstance(conflict, DeadLetter)
    assert conflict.failure.status == 409
    assert conflict.failure.errors[0].meta["duplicate_profile_id"]
    assert isinstance(invalid, DeadLetter)
    assert invalid.failure.errors[0].pointer == "/data/attributes/email"


def test_bulk_profile_import_waits_for_the_job_and_maps_its_errors_back(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    good = [profile_call(email=f"p{i}@example.com", first_name="P") for i in range(20)]
    bad = [profile_call(email=f"bad-{i}") for i in range(130)]  # more than one page of errors
    calls = [call for pair in zip(good, bad[:20], strict=True) for call in pair] + bad[20:]
    klaviyo_server.inject(BULK_PROFILE_IMPORT, Fault.error(503))
    klaviyo_server.inject(IMPORT_JOB, Fault.error(500))

    outcomes = make_sender(klaviyo_server).import_profiles(calls)

    delivered = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Delivered)]
    assert delivered == list(range(0, 40, 2))
    failed = outcomes[1]
    assert isinstance(failed, DeadLetter)
    assert "Invalid email address" in failed.reason
    assert klaviyo_server.profile(email="p7@example.com") == {
        "email": "p7@example.com",
        "first_name": "P",
    }
    assert klaviyo_server.statuses(BULK_PROFILE_IMPORT) == [503, 202]
    assert klaviyo_server.statuses(IMPORT_JOB) == [500, 200, 200]
    assert klaviyo_server.statuses(IMPORT_ERRORS) == [200, 200]


def test_an_import_job_that_does_not_finish_in_time_is_dead_lettered(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    client = KlaviyoClient(klaviyo_server.api_key, test_host=klaviyo_server.url)
    limiter = RateLimiter(scale=klaviyo_server.time_scale)
    sender = KlaviyoSender(client, limiter, Retrier(), job_timeout_seconds=0)

    outcomes = sender.import_profiles([profile_call(email="ann@example.com")])

    (outcome,) = outcomes
    assert isinstance(outcome, DeadLetter)
    assert (outcome.failure.kind, outcome.failure.label) == (ErrorKind.TRANSIENT, "job_timeout")
    assert "outcome is unknown" in outcome.reason
    assert klaviyo_server.statuses(IMPORT_JOB) == [200]


# --- the API key never leaks -------------------------------------------------------------------

SECRET = "pk_SECRET_d41d8cd98f00b204e980"


def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 and the SDK log at DEBUG
    seen: list[str] = []
    fake = FakeTime()
    policy = RetryPolicy(max_retry_seconds=2, first_backoff_seconds=0.5, max_backoff_seconds=1)
    retrier = Retrier(policy, clock=fake, sleep=fake.sleep, rand=lambda: 1.0)
    with KlaviyoTestServer(api_key=SECRET, time_scale=60.0) as server:
        sender = make_sender(server, api_key=SECRET, retrier=retrier, read_timeout=0.2)
        refused = make_sender(server, api_key=SECRET, retrier=retrier)  # used once it stopped
        # Each send gives up after 3 attempts: waits of 0.5 and 1 s, and 1 s more is too late.
        server.inject(BULK_EVENTS, *[Fault.error(500)] * 3, *[Fault.slow(0.5)] * 3)
        seen += map(repr, sender.send_events(many_events(3)))  # 500s until the deadline
        seen += map(repr, sender.send_events(many_events(3)))  # timeouts until the deadline
        seen += map(repr, sender.send_events([event_call("evt-x", time="not a time")]))
        seen.append(repr(sender.send_profile(profile_call(email="bad"))))
        server.inject(PROFILE_IMPORT, Fault.forbidden())
        try:
            sender.send_profile(profile_call(email="ann@example.com"))
        except KlaviyoConfigurationError as exc:
            seen.append("".join(traceback.format_exception(exc)))
        seen += [repr(sender), repr(sender._client)]
    seen += map(repr, refused.send_events(many_events(1)))  # connection refused

    assert len(seen) > 10
    assert any("DeadLetter" in text for text in seen)
    assert any("KlaviyoConfigurationError" in text for text in seen)
    assert "retrying" in caplog.text
    for text in [*seen, caplog.text]:
        assert SECRET not in text
