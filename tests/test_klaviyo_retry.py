"""Retry with full-jitter backoff and a deadline, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from transforms.klaviyo.errors import CallFailure, ErrorKind, KlaviyoCallError
from transforms.klaviyo.retry import Retrier, RetryPolicy

UNAVAILABLE = CallFailure(ErrorKind.TRANSIENT, "503", "HTTP 503", 503)
BAD = CallFailure(ErrorKind.PERMANENT, "400", "HTTP 400", 400)


class Script:
    """An attempt that fails with the given failures, then returns "ok"."""

    def __init__(self, *failures: CallFailure) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise KlaviyoCallError(self.failures.pop(0))
        return "ok"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def retrier(
    clock: Clock, rand: Callable[[], float] = lambda: 1.0, max_retry_seconds: float = 60.0
) -> Retrier:
    policy = RetryPolicy(
        max_retry_seconds=max_retry_seconds, first_backoff_seconds=0.5, max_backoff_seconds=4.0
    )
    return Retrier(policy, clock=clock, sleep=clock.sleep, rand=rand)


def test_transient_failures_are_retried_with_capped_exponential_backoff() -> None:
    clock = Clock()
    attempt = Script(*[UNAVAILABLE] * 6)
    retried: list[CallFailure] = []

    result = retrier(clock).run(attempt, on_retry=retried.append)

    assert result == "ok"
    assert attempt.calls == 7
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert retried == [UNAVAILABLE] * 6


def test_backoff_is_full_jitter() -> None:
    clock = Clock()

    retrier(clock, rand=lambda: 0.25).run(Script(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE))

    assert clock.sleeps == [0.125, 0.25, 0.5]


def test_retry_after_is_a_floor_on_the_wait() -> None:
    clock = Clock()
    throttled = CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429, retry_after=3.0)

    retrier(clock).run(Script(throttled))

    assert clock.sleeps == [3.0]


@pytest.mark.parametrize("kind", [ErrorKind.PERMANENT, ErrorKind.CONFIGURATION])
def test_other_failures_are_returned_at_once(kind: ErrorKind) -> None:
    clock = Clock()
    failure = CallFailure(kind, "400", "HTTP 400", 400)
    attempt = Script(failure)

    assert retrier(clock).run(attempt) == failure
    assert attempt.calls == 1
    assert clock.sleeps == []


def test_the_deadline_stops_retrying_and_returns_the_last_failure() -> None:
    clock = Clock()
    last = CallFailure(ErrorKind.TRANSIENT, "timeout", "timeout")
    attempt = Script(*[UNAVAILABLE] * 4, last, *[UNAVAILABLE] * 10)

    result = retrier(clock, max_retry_seconds=10.0).run(attempt)

    assert result == last
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]  # another 4 s would pass the 10 s deadline
    assert attempt.calls == 5
    assert clock.now <= 10.0


def test_a_retry_after_beyond_the_deadline_is_not_waited_for() -> None:
    clock = Clock()
    throttled = CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429, retry_after=30.0)

    result = retrier(clock, max_retry_seconds=10.0).run(Script(throttled))

    assert result == throttled
    assert clock.sleeps == []
