"""The retry schedule: full-jitter backoff that uses the deadline to the end, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from transforms.klaviyo.errors import CallFailure, ErrorKind
from transforms.klaviyo.retry import Retrier, RetryPolicy

UNAVAILABLE = CallFailure(ErrorKind.TRANSIENT, "503", "HTTP 503", 503)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def retrier(clock: Clock, rand: Callable[[], float] = lambda: 1.0) -> Retrier:
    policy = RetryPolicy(first_backoff_seconds=0.5, max_backoff_seconds=4.0)
    return Retrier(policy, clock=clock, sleep=clock.sleep, rand=rand)


def schedule(retrier: Retrier, clock: Clock, failure: CallFailure, deadline: float) -> list[float]:
    """The start times of the retries of an attempt that always fails with `failure`."""
    starts = []
    while (at := retrier.next_attempt_at(len(starts), failure, deadline)) is not None:
        retrier.wait_until(at)
        starts.append(clock.now)
    return starts


def test_waits_grow_exponentially_up_to_the_cap() -> None:
    clock = Clock()

    starts = schedule(retrier(clock), clock, UNAVAILABLE, deadline=24.0)

    assert clock.sleeps[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert starts[:3] == [0.5, 1.5, 3.5]


def test_backoff_is_full_jitter() -> None:
    clock = Clock()

    schedule(retrier(clock, rand=lambda: 0.25), clock, UNAVAILABLE, deadline=0.9)

    assert clock.sleeps[:3] == [0.125, 0.25, 0.5]


def test_retry_after_is_a_floor_on_the_wait() -> None:
    clock = Clock()
    throttled = CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429, retry_after=3.0)

    assert retrier(clock).next_attempt_at(0, throttled, deadline=60.0) == 3.0


def test_the_last_retry_starts_at_the_deadline_not_before_giving_up() -> None:
    """A long random wait does not end the retries early: it is cut to the deadline, where one
    last attempt starts; no attempt starts after it."""
    clock = Clock()

    starts = schedule(retrier(clock), clock, UNAVAILABLE, deadline=10.0)

    assert starts == [0.5, 1.5, 3.5, 7.5, 10.0]
    assert clock.now == 10.0


@pytest.mark.parametrize("rand", [0.01, 0.3, 0.999])
def test_the_deadline_is_reached_whatever_the_random_draws(rand: float) -> None:
    clock = Clock()

    starts = schedule(retrier(clock, rand=lambda: rand), clock, UNAVAILABLE, deadline=15.0)

    assert starts[-1] == 15.0


def test_a_retry_after_beyond_the_deadline_is_not_waited_for() -> None:
    clock = Clock()
    throttled = CallFailure(ErrorKind.TRANSIENT, "429", "HTTP 429", 429, retry_after=30.0)

    assert retrier(clock).next_attempt_at(0, throttled, deadline=10.0) is None
    assert clock.sleeps == []
