"""When to try a failed Klaviyo request again: full-jitter exponential backoff, up to a deadline.

The SDK's own retry is switched off, and so are urllib3's (see client.py): the SDK skips
500/502, timeouts and dropped connections and has no overall deadline, and urllib3 would retry
connection errors unseen and uncounted. The sender is the one retry layer; this module only says
when its next attempt may start. Each wait is `random() * min(max_backoff, first_backoff * 2**n)`
("full jitter", so senders that failed together do not retry together) and at least the
Retry-After Klaviyo asked for.

The caller's deadline is used to the end: a wait that would pass it is cut short so that one last
attempt starts at the deadline, rather than giving up early because one random draw was long.
Only a Retry-After beyond the deadline (Klaviyo said it will refuse until then) ends the retries
before it. No attempt starts after the deadline.

Retrying writes is safe because every event carries a `unique_id` and profile upserts are
idempotent.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from transforms.klaviyo.errors import CallFailure


@dataclass(frozen=True)
class RetryPolicy:
    first_backoff_seconds: float = 0.5
    max_backoff_seconds: float = 30.0


class Retrier:
    """The backoff schedule and the clock it runs on; stateless, safe to share by threads."""

    def __init__(
        self,
        policy: RetryPolicy = RetryPolicy(),
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._sleep = sleep
        self._rand = rand

    def next_attempt_at(self, retries: int, failure: CallFailure, deadline: float) -> float | None:
        """When retry number `retries + 1` of a transient `failure` may start, or None when it
        may not start before `deadline` (module docstring)."""
        now = self.clock()
        floor = now + (failure.retry_after or 0.0)
        if floor > deadline or now >= deadline:
            return None
        policy = self.policy
        growth = 2 ** min(retries, 32)  # capped: a float overflows long before the cap matters
        ceiling = min(policy.max_backoff_seconds, policy.first_backoff_seconds * growth)
        return min(deadline, max(floor, now + self._rand() * ceiling))

    def wait_until(self, moment: float) -> float:
        """Sleep until `moment` on the clock; the seconds slept (reported as throttling)."""
        seconds = moment - self.clock()
        if seconds <= 0:
            return 0.0
        self._sleep(seconds)
        return seconds
