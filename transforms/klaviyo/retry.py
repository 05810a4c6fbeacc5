"""Retry transient Klaviyo failures with full-jitter exponential backoff, up to a deadline.

The SDK's own retry is switched off (see client.py): it skips 500/502, timeouts and dropped
connections and has no overall deadline. Here every TRANSIENT failure is retried, each sleep is
`random() * min(max_backoff, first_backoff * 2**n)` ("full jitter", so workers that failed
together do not retry together) and at least the Retry-After Klaviyo asked for. When the next
attempt could not start before `max_retry_seconds` have passed since the first one, the last
failure is returned for the caller to dead-letter; a stuck request never blocks a worker forever.

Retrying writes is safe because every event carries a `unique_id` and profile upserts are
idempotent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from transforms.klaviyo.errors import CallFailure, ErrorKind, KlaviyoCallError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_retry_seconds: float = 120.0
    first_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0


class Retrier:
    """Runs one request until it succeeds, fails permanently, or runs out of time."""

    def __init__(
        self,
        policy: RetryPolicy = RetryPolicy(),
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._rand = rand

    def run(
        self,
        attempt: Callable[[], T],
        on_retry: Callable[[CallFailure], None] = lambda failure: None,
    ) -> T | CallFailure:
        """Call `attempt` until it returns; return its result or the last `CallFailure`.

        `attempt` signals failure by raising `KlaviyoCallError`. Non-transient failures are
        returned at once. `on_retry` is told about each failure that will be retried.
        """
        policy = self._policy
        deadline = self._clock() + policy.max_retry_seconds
        retries = 0
        while True:
            try:
                return attempt()
            except KlaviyoCallError as exc:
                failure = exc.failure
            if failure.kind is not ErrorKind.TRANSIENT:
                return failure
            ceiling = min(policy.max_backoff_seconds, policy.first_backoff_seconds * 2**retries)
            delay = max(self._rand() * ceiling, failure.retry_after or 0.0)
            if self._clock() + delay > deadline:
                return failure
            on_retry(failure)
            self._sleep(delay)
            retries += 1
