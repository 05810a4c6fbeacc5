"""The client-side rate limiter, on a fake clock: no real waiting, no timing assertions."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter, max_keys

M = 1.01  # the limiter holds each window 1 % longer (workers' clocks differ a little)


class FakeClock:
    """Time moves only when someone sleeps. Remembers, per thread, the last time it told."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()
        self._seen = threading.local()

    def __call__(self) -> float:
        with self._lock:
            self._seen.value = self.now
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    @property
    def last_seen(self) -> float:
        value: float = self._seen.value
        return value


def limiter(
    clock: FakeClock,
    limits: dict[Endpoint, Limit] | None = None,
    scale: float = 1.0,
    share: float = 1.0,
) -> RateLimiter:
    return RateLimiter(limits, scale=scale, share=share, clock=clock, sleep=clock.sleep,
                       wall=lambda: 1_700_000_000 + clock.now)  # the wall moves with the clock


def grant_times(rate_limiter: RateLimiter, clock: FakeClock, count: int) -> list[float]:
    times = []
    for _ in range(count):
        rate_limiter.acquire(Endpoint.BULK_EVENTS)
        times.append(clock.now)
    return times


def keep_throttling(rate_limiter: RateLimiter, clock: FakeClock, count: int) -> None:
    """`count` 429s, each for a request granted after the previous 429, all within a minute."""
    for _ in range(count):
        granted_at = rate_limiter.acquire(Endpoint.BULK_EVENTS)
        clock.sleep(0.5)
        rate_limiter.throttled(Endpoint.BULK_EVENTS, retry_after=None, granted_at=granted_at)
        clock.sleep(0.5)


def most_in_any_window(times: Sequence[float], seconds: float) -> int:
    """The most times in any half-open span [t, t + seconds): every fixed window's count,
    whatever its alignment, is at most this."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, time in enumerate(ordered):
        while ordered[first] <= time - seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_published_burst_then_steady_limits() -> None:
    clock = FakeClock()

    times = grant_times(limiter(clock), clock, 160)

    assert times[:10] == [0.0] * 10  # Klaviyo's burst: 10 per second
    assert times[10] == pytest.approx(M)  # a second, and the margin for the way to Klaviyo
    assert times[149] < 60.0
    assert times[150] == pytest.approx(60.0 * M)  # steady: 150 per minute
    assert most_in_any_window(times, 1.0) == 10
    assert most_in_any_window(times, 60.0) == 150


def test_endpoints_are_limited_separately() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock)

    grant_times(rate_limiter, clock, 10)
    granted_at = rate_limiter.acquire(Endpoint.PROFILE_IMPORT)

    assert granted_at == 0.0
    assert clock.now == 0.0


def test_scale_shortens_the_windows() -> None:
    clock = FakeClock()

    times = grant_times(limiter(clock, scale=60), clock, 151)

    assert times[9] == 0.0
    assert times[10] == pytest.approx(M / 60)
    assert times[150] == pytest.approx(M)  # a "minute" of a 60x faster test server


def test_a_share_keeps_each_key_to_its_part_of_the_account_limit() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock, share=1 / 4)

    times = grant_times(rate_limiter, clock, 40)

    assert most_in_any_window(times, 1.0) == 2  # 10/4 rounds down: never over the share
    assert most_in_any_window(times, 60.0) == 37  # 150/4 rounds down
    assert rate_limiter.budget(Endpoint.BULK_EVENTS) == (37.0, 1.0)


def test_no_share_is_below_one_request_per_window() -> None:
    """Ten keys of one request per second each fit the bulk burst of 10; eleven cannot."""
    assert max_keys() == 10
    assert max_keys({Endpoint.BULK_EVENTS: Limit(4, 20)}) == 4
    RateLimiter(share=1 / 10)
    with pytest.raises(ValueError, match="at most 10 keys"):
        RateLimiter(share=1 / 11)


def test_a_backed_off_rate_below_one_per_window_spaces_requests_out() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock, limits={Endpoint.BULK_EVENTS: Limit(2, 600)})
    keep_throttling(rate_limiter, clock, 3)  # a 429, then two that keep coming: two halvings
    clock.sleep(60)

    times = grant_times(rate_limiter, clock, 3)

    assert [t - times[0] for t in times] == pytest.approx([0.0, 2 * M, 4 * M])  # one every 2 s


def test_overrides_replace_the_published_limit() -> None:
    clock = FakeClock()

    times = grant_times(limiter(clock, limits={Endpoint.BULK_EVENTS: Limit(1, 60)}), clock, 3)

    assert times == pytest.approx([0.0, M, 2 * M])


def test_a_lone_429_pauses_for_retry_after_and_keeps_the_rate() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock)
    granted_at = rate_limiter.acquire(Endpoint.BULK_EVENTS)
    clock.sleep(1.5)

    rate_limiter.throttled(Endpoint.BULK_EVENTS, retry_after=3, granted_at=granted_at)
    times = grant_times(rate_limiter, clock, 11)

    assert times[:10] == [4.5] * 10  # after the pause, the full burst
    assert times[10] == pytest.approx(4.5 + M)


def test_429s_of_requests_in_flight_together_count_once() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock)
    in_flight = [rate_limiter.acquire(Endpoint.BULK_EVENTS) for _ in range(4)]  # four threads
    clock.sleep(0.5)

    for granted_at in in_flight:
        rate_limiter.throttled(Endpoint.BULK_EVENTS, retry_after=2, granted_at=granted_at)
    times = grant_times(rate_limiter, clock, 11)

    assert times[:10] == [2.5] * 10  # one throttling, not four: the rate is whole
    assert times[10] == pytest.approx(2.5 + M)


def test_429s_that_keep_coming_slow_down_and_successes_win_the_rate_back() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock)
    keep_throttling(rate_limiter, clock, 4)

    clock.sleep(60)
    slow = grant_times(rate_limiter, clock, 2)
    for _ in range(40):
        rate_limiter.succeeded(Endpoint.BULK_EVENTS)
    clock.sleep(60)
    fast = grant_times(rate_limiter, clock, 11)

    assert slow[1] - slow[0] == pytest.approx(M)  # a lone 429, three halvings: 10/8 per s is 1
    assert fast[9] == fast[0]
    assert fast[10] == pytest.approx(fast[0] + M)


def test_threads_sharing_a_limiter_never_exceed_it() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock)
    granted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            rate_limiter.acquire(Endpoint.BULK_EVENTS)
            with lock:
                granted.append(clock.last_seen)  # the time the limiter granted it at

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(granted) == 200
    assert most_in_any_window(granted, 1.0) <= 10
    assert most_in_any_window(granted, 60.0) <= 150


def test_a_request_counts_until_its_answer() -> None:
    """Klaviyo counts a request when it arrives, at the latest when it answers: the limiter
    counts it from its answer on, so the next one waits a full window after that."""
    clock = FakeClock()
    rate_limiter = limiter(clock, limits={Endpoint.BULK_EVENTS: Limit(1, 60)})
    clock.sleep(0.5)
    granted_at = rate_limiter.acquire(Endpoint.BULK_EVENTS)
    clock.sleep(0.7)  # on its way, and answered at 1.2

    rate_limiter.answered(Endpoint.BULK_EVENTS, granted_at)

    assert rate_limiter.acquire(Endpoint.BULK_EVENTS) == pytest.approx(1.2 + M)


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        RateLimiter(scale=0)
    with pytest.raises(ValueError):
        RateLimiter(share=0)
    with pytest.raises(ValueError):
        RateLimiter(share=1.5)


def test_a_request_that_cannot_be_granted_by_the_deadline_is_not_counted() -> None:
    clock = FakeClock()
    rate_limiter = limiter(clock, limits={Endpoint.BULK_EVENTS: Limit(1, 60)})
    rate_limiter.acquire(Endpoint.BULK_EVENTS)

    refused = rate_limiter.acquire(Endpoint.BULK_EVENTS, deadline=0.5)
    granted = rate_limiter.acquire(Endpoint.BULK_EVENTS, deadline=1.1)

    assert refused is None
    assert clock.now == pytest.approx(M)  # the refusal did not sleep; the grant waited
    assert granted == pytest.approx(M)  # the refused request took no slot
    assert rate_limiter.acquire(Endpoint.BULK_EVENTS, deadline=1.5) is None


def test_a_key_moved_to_another_process_keeps_its_pacing() -> None:
    """The limiter of a key's new process takes over the grants made in the old one (the two
    have unrelated monotonic clocks; wall-clock time is what they share)."""
    old_clock, new_clock = FakeClock(), FakeClock()
    new_clock.now = 5000.0
    wall = FakeClock()

    def wall_time() -> float:
        return 1_700_000_000 + wall.now

    old = RateLimiter(scale=60, clock=old_clock, sleep=old_clock.sleep, wall=wall_time)
    grant_times(old, old_clock, 150)  # a full steady minute (of the 60x faster server)
    new = RateLimiter(scale=60, clock=new_clock, sleep=new_clock.sleep, wall=wall_time)
    snapshot = old.snapshot()

    new.restore(snapshot)
    granted = new.acquire(Endpoint.BULK_EVENTS)

    # the window of the first grant (old_clock.now ago) closes M later: the new limiter waits
    assert granted == pytest.approx(5000.0 + M - old_clock.now, abs=0.002)
    assert granted > 5000.5
    fresh = RateLimiter(scale=60, clock=new_clock, sleep=new_clock.sleep, wall=wall_time)
    assert fresh.acquire(Endpoint.BULK_EVENTS) == new_clock.now  # the control: no history
    assert len(snapshot) < 4000
    new.restore(b"")  # an empty state: nothing recorded
    assert new.snapshot() == b"{}"


def test_a_process_descheduled_while_restoring_never_places_grants_earlier() -> None:
    """`restore` reads two clocks; a process descheduled between the readings (a starved
    worker) must err towards later grants: an earlier one would let the next request into the
    window of the last one sent in the old process."""
    true_time = FakeClock()  # one key's time, whichever process it runs in
    old = RateLimiter({Endpoint.BULK_EVENTS: Limit(1, 60)}, clock=true_time,
                      sleep=true_time.sleep, wall=lambda: 1_700_000_000 + true_time.now)
    granted_at = old.acquire(Endpoint.BULK_EVENTS)
    true_time.sleep(0.2)
    old.answered(Endpoint.BULK_EVENTS, granted_at)  # counts at 0.2 from now on
    snapshot = old.snapshot()

    def new_clock() -> float:
        return 5000.0 + true_time.now

    def descheduled_wall() -> float:
        true_time.sleep(0.5)  # the process loses the CPU for half a second right here
        return 1_700_000_000 + true_time.now

    new = RateLimiter({Endpoint.BULK_EVENTS: Limit(1, 60)}, clock=new_clock,
                      sleep=true_time.sleep, wall=descheduled_wall)
    new.restore(snapshot)
    new.acquire(Endpoint.BULK_EVENTS)

    assert true_time.now >= 0.2 + M - 1e-6  # the old answer's window (float error aside)


def test_a_backed_off_spacing_moves_with_the_key() -> None:
    """Below one request per window (after 429s kept coming), a key waits longer than the
    window between requests; a move to another process mid-wait must not cut it short."""
    clock = FakeClock()
    limits = {Endpoint.BULK_EVENTS: Limit(2, 600)}
    old = limiter(clock, limits=limits)
    keep_throttling(old, clock, 3)  # two halvings: one request every 2 s
    clock.sleep(60)
    granted_at = old.acquire(Endpoint.BULK_EVENTS)
    old.answered(Endpoint.BULK_EVENTS, granted_at)
    clock.sleep(1.5)  # past the 1 s window, not past the 2 s spacing

    new = limiter(clock, limits=limits)
    new.restore(old.snapshot())

    assert new.acquire(Endpoint.BULK_EVENTS) == pytest.approx(granted_at + 2 * M, abs=0.002)


def test_a_retried_bundle_keeps_the_requests_its_failed_attempt_made() -> None:
    """A bundle can fail after its requests went out: its pacing state is never committed, and
    the retry reads the state before it. The limiter of the process that made those requests
    still knows them, and a state it wrote or read itself holds nothing newer."""
    clock = FakeClock()
    limits = {Endpoint.BULK_EVENTS: Limit(1, 60)}
    key = limiter(clock, limits=limits)
    first = key.acquire(Endpoint.BULK_EVENTS)
    key.answered(Endpoint.BULK_EVENTS, first)
    committed = key.snapshot()  # the first flush's bundle commits its pacing
    clock.sleep(2)
    second = key.acquire(Endpoint.BULK_EVENTS)
    key.answered(Endpoint.BULK_EVENTS, second)
    key.snapshot()  # the second bundle fails after sending: this state is never committed

    key.restore(committed)  # its retry reads the committed state

    assert key.acquire(Endpoint.BULK_EVENTS) == pytest.approx(second + M, abs=0.002)
    elsewhere = limiter(clock, limits=limits)  # another process's newer state still wins
    elsewhere.restore(committed)
    moved = elsewhere.acquire(Endpoint.BULK_EVENTS)
    elsewhere.answered(Endpoint.BULK_EVENTS, moved)
    key.restore(elsewhere.snapshot())
    assert key.acquire(Endpoint.BULK_EVENTS) == pytest.approx(moved + M, abs=0.002)
