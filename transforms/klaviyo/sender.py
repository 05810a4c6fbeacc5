"""Deliver planned Klaviyo calls within a deadline and say, per call, what became of it.

The pipeline plans calls as `(method, body)` pairs in wire format. This module sends them:

    plan bulk requests (bulk.py) → rate limiter (rate_limit.py) → SDK call (client.py)
      → on failure: classify (errors.py) → retry transient ones until the deadline (retry.py)

and returns one `Outcome` per call:

- `Delivered`;
- `DeadLetter`, with the reason and Klaviyo's error detail: Klaviyo will not take it as sent;
- `Pending`, with the last transient failure (None if it was never sent): not settled by the
  caller's `deadline`. The caller keeps it and sends it again later; `expired` makes its dead
  letter once the caller's own retry time (`--max_retry_seconds`) is over.

The sender never blocks past the deadline (no attempt starts after it) and never polls in a
loop: a bulk profile import is started by `start_profile_import` and polled by the caller, later,
with `poll_profile_import`.

Partial failures are isolated so that one bad payload never takes its batch:

- a 400 whose JSON pointers name entries dead-letters those entries and resends the rest;
- a request Klaviyo keeps failing on transiently (5xx, a dropped connection) is bisected until
  the failing calls are alone: only they end Pending (and then dead-lettered) with the last
  error. A part that failed is split at once when another request to the same endpoint
  succeeded since the part was formed (Klaviyo works: the payload is the problem). Without
  that evidence a part is split only after three failures, and at most twice between two
  successes: enough to find two poisons in one request, while an outage (nothing succeeds)
  leaves at most three parts retried with backoff instead of multiplying the requests.

The requests of one `send_events` go one after another (a key is serial, so its pacing holds);
while one is in flight, a helper thread validates and encodes the next (the CPU of a request,
tens of ms for 1,000 events, overlaps the wait for Klaviyo's answer instead of following it).
Encoding is pure, so nothing else changes: the same requests in the same order, each sent only
after the one before it is settled.

Configuration failures (bad key, missing scope) raise `KlaviyoConfigurationError` instead,
because every further call would fail the same way.

Counts go to a `Metrics` callback (the Beam layer binds it to Beam metrics, see `Metrics`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from transforms.klaviyo.bulk import (
    MAX_EVENTS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    Batch,
    Json,
    ProfileBatch,
    SingleCall,
    plan_event_batches,
    plan_profile_batches,
)
from transforms.klaviyo.client import Encoded, KlaviyoClient, Response, next_page_cursor
from transforms.klaviyo.errors import (
    ApiError,
    CallFailure,
    ErrorKind,
    KlaviyoCallError,
    KlaviyoConfigurationError,
    api_error,
)
from transforms.klaviyo.rate_limit import Endpoint, RateLimiter
from transforms.klaviyo.retry import Retrier
from transforms.klaviyo.wire import CREATE_EVENT, CREATE_OR_UPDATE_PROFILE

log = logging.getLogger(__name__)

PlannedCall = tuple[str, Mapping[str, Any]]
B = TypeVar("B", bound=Batch)

DUPLICATE_IN_BATCH = "duplicate in batch"
_BLIND_SPLIT_AFTER = 3  # transient failures before a part is split without evidence of health
_BLIND_SPLITS = 2  # such splits allowed between two successes of one delivery


@dataclass(frozen=True)
class Delivered:
    """Klaviyo accepted the call (202/200/201). `note` says why when nothing was sent for it."""

    note: str = ""


@dataclass(frozen=True)
class DeadLetter:
    """Klaviyo will not take the call as it is; `failure` holds its status and error objects."""

    reason: str
    failure: CallFailure


@dataclass(frozen=True)
class Pending:
    """Not settled by the deadline; `failure` is the last transient one (None: never sent)."""

    failure: CallFailure | None = None


Outcome = Delivered | DeadLetter | Pending

_NOT_SENT = CallFailure(
    ErrorKind.TRANSIENT, "rate_limited", "never sent: the rate limit left no room in time"
)


def expired(pending: Pending) -> DeadLetter:
    """The dead letter of a call still pending when the caller's retry time is over."""
    return _dead_letter(pending.failure or _NOT_SENT)


@dataclass(frozen=True)
class ImportJob:
    """A submitted bulk profile import: Klaviyo's job id and how many profiles it carries."""

    job_id: str
    size: int

    def to_json(self) -> list[Any]:
        """A small JSON value for Beam state; `from_json` reads it back."""
        return [self.job_id, self.size]

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> ImportJob:
        job_id, size = value
        return cls(str(job_id), int(size))


class Metrics(Protocol):
    """Where counts go.

    Counters: `<endpoint>_requests_<status>` (every attempt), `<endpoint>_granted` (requests the
    limiter let out), `<endpoint>_retries`, `<endpoint>_throttled` (429s), `<endpoint>_splits`
    (bisections). Distribution `<endpoint>_latency_ms`. Gauges: `<endpoint>_allowed_per_minute`
    (this limiter's share of the account limit) and `<endpoint>_rate_percent` (how much of it
    the adaptive back-off lets through now). `throttled(seconds)`: time spent waiting for the
    limiter or in a retry back-off (Beam's `cumulativeThrottlingSeconds`).
    """

    def count(self, name: str, value: int = 1) -> None: ...

    def observe(self, name: str, value: float) -> None: ...

    def gauge(self, name: str, value: float) -> None: ...

    def throttled(self, seconds: float) -> None: ...


class NoMetrics:
    """The default: count nothing."""

    def count(self, name: str, value: int = 1) -> None:
        pass

    def observe(self, name: str, value: float) -> None:
        pass

    def gauge(self, name: str, value: float) -> None:
        pass

    def throttled(self, seconds: float) -> None:
        pass


@dataclass
class _Part(Generic[B]):
    """A request being delivered: the whole one or a piece of a bisection."""

    batch: B
    since: int  # the endpoint's success count when it was formed: more shows Klaviyo works
    failures: int = 0  # transient failures other than 429
    retries: int = 0
    next_at: float = -math.inf
    last: CallFailure | None = None
    request: Callable[[], Response] | None = None  # built once, reused by every retry


@dataclass
class _BlindSplits:
    """How many more parts of one delivery may be split without evidence that Klaviyo works."""

    left: int = _BLIND_SPLITS


class KlaviyoSender:
    """Sends planned calls through one client, limiter and retrier; safe to share by threads."""

    def __init__(
        self,
        client: KlaviyoClient,
        limiter: RateLimiter,
        retrier: Retrier,
        metrics: Metrics | None = None,
        *,
        max_events_per_request: int = MAX_EVENTS_PER_REQUEST,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._retrier = retrier
        self._clock = retrier.clock
        self._metrics = metrics or NoMetrics()
        self._max_events = max_events_per_request
        self._max_bytes = max_request_bytes
        self._successes: Counter[Endpoint] = Counter()

    def send_events(self, calls: Sequence[PlannedCall], *, deadline: float,
                    planned: Callable[[], object] | None = None) -> list[Outcome]:
        """Send `create_event` calls with bulk requests; one outcome per call, in order.
        `planned` is called once the requests are planned, before the first is sent."""
        if self._clock() + self._limiter.available_in(Endpoint.BULK_EVENTS) > deadline:
            # No request could be granted before the deadline: all Pending, as they would end,
            # without planning and encoding a request that cannot go (a batch job's last flush
            # asks again every second while its keys wait for the next minute).
            return [Pending(None) for _ in calls]
        bodies = [_body(call, CREATE_EVENT) for call in calls]
        plan = plan_event_batches(bodies, self._max_events, self._max_bytes)
        if planned is not None:
            planned()
        outcomes: dict[int, Outcome] = {}
        client = self._client
        prepare = _prepare(client.encode_bulk_events, client.bulk_create_events)
        batches = plan.batches
        ahead = _Lookahead(prepare, lambda: self._clock() <= deadline) \
            if len(batches) > 1 else None
        granted = None if ahead is None else ahead.start
        try:
            for position, batch in enumerate(batches):
                current = None
                if ahead is not None:
                    current = ahead.take()
                    ahead.follow(batches[position + 1] if position + 1 < len(batches) else None)
                prepare_batch = (prepare if current is None
                                 else _prepared_first(current, prepare))
                for sent, _ in self._deliver(Endpoint.BULK_EVENTS, batch, prepare_batch, deadline,
                                             outcomes, granted):
                    outcomes.update(dict.fromkeys(sent.indexes, Delivered()))
        finally:
            if ahead is not None:
                ahead.close()
        for duplicate, first in plan.duplicates.items():
            outcomes[duplicate] = _as_duplicate(outcomes[first])
        return [outcomes[index] for index in range(len(calls))]

    def send_profile(self, call: PlannedCall, *, deadline: float) -> Outcome:
        """Send one `create_or_update_profile` call (POST /api/profile-import)."""
        batch = SingleCall(0, dict(_body(call, CREATE_OR_UPDATE_PROFILE)))
        outcomes: dict[int, Outcome] = {}

        def prepare(single: SingleCall) -> Callable[[], Response]:
            # One profile: the SDK's own method (it validates on every attempt) costs little.
            return partial(self._client.create_or_update_profile, single.body())

        if self._deliver(Endpoint.PROFILE_IMPORT, batch, prepare, deadline, outcomes):
            return Delivered()
        return outcomes[0]

    def start_profile_import(
        self, calls: Sequence[PlannedCall], *, deadline: float
    ) -> tuple[list[tuple[ImportJob, list[int]]], dict[int, Outcome]]:
        """Submit `create_or_update_profile` calls as bulk import jobs (for large syncs).

        Returns the jobs Klaviyo accepted, each with the indexes (into `calls`) of the calls it
        carries, to poll later; and the outcomes of the calls in no job (rejected, or Pending:
        not submitted by the deadline). Unlike profile-import, a bulk import ignores null
        values: it cannot clear a field.
        """
        bodies = [_body(call, CREATE_OR_UPDATE_PROFILE) for call in calls]
        outcomes: dict[int, Outcome] = {}
        jobs: list[tuple[ImportJob, list[int]]] = []
        client = self._client
        prepare = _prepare(client.encode_bulk_import, client.bulk_import_profiles)
        for batch in plan_profile_batches(bodies, max_bytes=self._max_bytes):
            accepted = self._deliver(
                Endpoint.BULK_PROFILE_IMPORT, batch, prepare, deadline, outcomes
            )
            jobs += [(ImportJob(str(response.data["data"]["id"]), len(sent.indexes)), sent.indexes)
                     for sent, response in accepted]
        return jobs, outcomes

    def poll_profile_import(
        self, job: ImportJob, calls: Sequence[PlannedCall], *, deadline: float
    ) -> list[Outcome] | None:
        """Ask once how an import job is doing, `calls` being the job's calls in the order
        `start_profile_import` listed their indexes; returns their outcomes in that order.

        None while the job runs, or when the rate limit left no room to ask before `deadline`.
        Pending outcomes (the poll failed transiently) also mean: poll again later. The job's
        import errors name the profiles it rejected.
        """
        result = self._attempt(
            Endpoint.IMPORT_JOBS, partial(self._client.get_bulk_import_job, job.job_id), deadline
        )
        if result is None:
            return None
        if isinstance(result, CallFailure):
            return _all(len(calls), result)
        status = str(result.data["data"]["attributes"]["status"])
        if status == "cancelled":
            failure = CallFailure(
                ErrorKind.PERMANENT, status, f"import job {job.job_id} was cancelled"
            )
            return _all(len(calls), failure)
        if status != "complete":
            return None
        errors = self._import_errors(job.job_id, deadline)
        if errors is None or isinstance(errors, CallFailure):
            return None if errors is None else _all(len(calls), errors)
        profiles = [_body(call, CREATE_OR_UPDATE_PROFILE)["data"] for call in calls]
        batch = ProfileBatch(tuple(enumerate(profiles)))
        return self._import_job_outcomes(job.job_id, batch, errors)

    def _deliver(
        self,
        endpoint: Endpoint,
        batch: B,
        prepare: Callable[[B], Callable[[], Response]],
        deadline: float,
        outcomes: dict[int, Outcome],
        granted: Callable[[], None] | None = None,
    ) -> list[tuple[B, Response]]:
        """Deliver one request by `deadline`, isolating what Klaviyo will not take (module
        docstring); returns the parts it accepted with their responses. Calls dead-lettered
        or still pending go into `outcomes`. `prepare` makes a part's request from its batch,
        once: it raises `KlaviyoCallError` when the SDK's model refuses the body (nothing is
        sent then, and the entries the failure names are isolated like a 400's). `granted` is
        called each time the limiter grants an attempt, just before it is sent."""
        accepted: list[tuple[B, Response]] = []
        parts = [_Part(batch, since=self._successes[endpoint])]
        blind = _BlindSplits()
        while parts:
            part = min(parts, key=lambda candidate: candidate.next_at)
            waited = self._retrier.wait_until(part.next_at)
            if waited:
                self._metrics.throttled(waited)
            if self._clock() > deadline:
                break
            try:
                part.request = part.request or prepare(part.batch)
            except KlaviyoCallError as refused:
                parts.remove(part)
                parts += self._after_failure(endpoint, part, refused.failure, deadline, outcomes,
                                             blind)
                continue
            result = self._attempt(endpoint, part.request, deadline, granted)
            if result is None:  # the limiter has no room for this endpoint before the deadline
                break
            parts.remove(part)
            if isinstance(result, Response):
                accepted.append((part.batch, result))
                blind = _BlindSplits()
                parts = [piece for other in parts for piece in self._split(endpoint, other, blind)]
            else:
                parts += self._after_failure(endpoint, part, result, deadline, outcomes, blind)
        for part in parts:
            outcomes.update(dict.fromkeys(part.batch.indexes, Pending(part.last)))
        return accepted

    def _after_failure(
        self,
        endpoint: Endpoint,
        part: _Part[B],
        failure: CallFailure,
        deadline: float,
        outcomes: dict[int, Outcome],
        blind: _BlindSplits,
    ) -> list[_Part[B]]:
        """What is left to send of a part that failed: dead letters go into `outcomes`."""
        if failure.kind is ErrorKind.PERMANENT:
            named = _named_calls(failure, part.batch.calls_at)
            if not named:
                outcomes.update(dict.fromkeys(part.batch.indexes, _dead_letter(failure)))
                return []
            for index, errors in named.items():
                outcomes[index] = _dead_letter(replace(failure, errors=tuple(errors)))
            rest = part.batch.without(named)
            return [] if rest is None else [replace(part, batch=rest, next_at=-math.inf,
                                                    request=None)]
        part.last = failure
        if failure.status != 429:  # a 429 says nothing about the payload
            part.failures += 1
            pieces = self._split(endpoint, part, blind)
            if len(pieces) > 1:
                return pieces
        at = self._retrier.next_attempt_at(part.retries, failure, deadline)
        if at is None:
            outcomes.update(dict.fromkeys(part.batch.indexes, Pending(failure)))
            return []
        self._metrics.count(f"{endpoint}_retries")
        log.info("%s: retrying after %s", endpoint, failure.summary)
        part.retries += 1
        part.next_at = at
        return [part]

    def _split(self, endpoint: Endpoint, part: _Part[B], blind: _BlindSplits) -> list[_Part[B]]:
        """The part's halves when it failed transiently and Klaviyo is known to work, or it
        failed often and `blind` allows a split without that evidence (module docstring);
        else the part itself."""
        healthy = self._successes[endpoint] > part.since
        often = part.failures >= _BLIND_SPLIT_AFTER and blind.left > 0
        halves = part.batch.halves() if part.failures and (healthy or often) else None
        if halves is None:
            return [part]
        if not healthy:
            blind.left -= 1
        self._metrics.count(f"{endpoint}_splits")
        since = self._successes[endpoint]
        return [_Part(half, since=since, last=part.last) for half in halves]

    def _import_job_outcomes(
        self, job_id: str, batch: ProfileBatch, errors: list[tuple[ApiError, Json]]
    ) -> list[Outcome]:
        """A finished job's outcomes: its import errors name the profiles it rejected."""
        named: dict[int, list[ApiError]] = defaultdict(list)
        for error, original_payload in errors:
            indexes = batch.calls_sent_as(original_payload)
            if not indexes:
                self._metrics.count(f"{Endpoint.IMPORT_JOBS}_unmatched_errors")
                log.warning(
                    "import job %s reported an error for no profile we sent: %s",
                    job_id,
                    error.describe(),
                )
            for index in indexes:
                named[index].append(error)
        return [
            _dead_letter(_import_failure(job_id, named[index])) if index in named else Delivered()
            for index in batch.indexes
        ]

    def _import_errors(
        self, job_id: str, deadline: float
    ) -> list[tuple[ApiError, Json]] | CallFailure | None:
        """All import errors of a finished job, with the profile each one was about; None when
        the rate limit left no room to read them all before the deadline."""
        errors: list[tuple[ApiError, Json]] = []
        cursor: str | None = None
        while True:
            result = self._attempt(
                Endpoint.IMPORT_JOBS,
                partial(self._client.get_import_errors, job_id, cursor),
                deadline,
            )
            if result is None or isinstance(result, CallFailure):
                return result
            for resource in result.data.get("data") or []:
                attributes = resource.get("attributes") or {}
                errors.append((api_error(attributes), attributes.get("original_payload") or {}))
            cursor = next_page_cursor(result)
            if cursor is None:
                return errors

    def _attempt(
        self, endpoint: Endpoint, request: Callable[[], Response], deadline: float,
        granted: Callable[[], None] | None = None,
    ) -> Response | CallFailure | None:
        """One attempt: rate-limited, timed and counted. None when the limiter could not grant
        it before `deadline`; `granted` is called once it is granted. Raises
        `KlaviyoConfigurationError` when the key is refused."""
        asked = self._clock()
        granted_at = self._limiter.acquire(endpoint, deadline=deadline)
        if granted_at is None:
            return None
        if granted_at > asked:
            self._metrics.throttled(granted_at - asked)
        if granted is not None:
            granted()
        self._count_grant(endpoint)
        started = self._clock()
        try:
            result = request()
        except KlaviyoCallError as exc:
            failure = exc.failure
            self._count_request(endpoint, failure.label, started)
            if failure.status == 429:
                self._metrics.count(f"{endpoint}_throttled")
                self._limiter.throttled(endpoint, failure.retry_after, granted_at)
            if failure.kind is ErrorKind.CONFIGURATION:
                raise KlaviyoConfigurationError(
                    f"Klaviyo refused the API key ({failure.summary}). Check that it is a "
                    "private key of this account with the profiles:write and events:write "
                    "scopes."
                ) from None
            return failure
        finally:  # whatever ended the attempt, even an exception nobody expected
            self._limiter.answered(endpoint, granted_at)
        self._count_request(endpoint, str(result.status), started)
        self._limiter.succeeded(endpoint)
        self._successes[endpoint] += 1
        return result

    def _count_grant(self, endpoint: Endpoint) -> None:
        self._metrics.count(f"{endpoint}_granted")
        allowed_per_minute, factor = self._limiter.budget(endpoint)
        self._metrics.gauge(f"{endpoint}_allowed_per_minute", allowed_per_minute)
        self._metrics.gauge(f"{endpoint}_rate_percent", factor * 100)

    def _count_request(self, endpoint: Endpoint, status: str, started: float) -> None:
        self._metrics.count(f"{endpoint}_requests_{status}")
        self._metrics.observe(f"{endpoint}_latency_ms", (self._clock() - started) * 1000)


def _prepare(
    encode: Callable[[Json], Encoded], send: Callable[[Encoded], Response]
) -> Callable[[Batch], Callable[[], Response]]:
    """A bulk endpoint's `prepare` for `_deliver`: encode the body once, send those bytes."""

    def prepare(batch: Batch) -> Callable[[], Response]:
        return partial(send, encode(batch.body()))

    return prepare


class _Lookahead(Generic[B]):
    """The next request of a send, encoded on a helper thread while the current one is in
    flight: from its grant on, not before. Encoding it earlier made the first request of every
    key wait: at the end of a batch job all keys prepare their first request at once, sharing
    one interpreter lock, and each key's second encoding competed with the first ones
    (bench/pipeline_throughput.py: the keys' first requests spread over up to 0.5 s)."""

    def __init__(self, prepare: Callable[[B], Callable[[], Response]],
                 in_time: Callable[[], bool]) -> None:
        self._prepare = prepare
        self._in_time = in_time  # False once the send's deadline has passed: encode nothing
        self._pool = ThreadPoolExecutor(1, "sink-encode")
        self._following: B | None = None
        self._encoding: Future[Callable[[], Response]] | None = None

    def take(self) -> Future[Callable[[], Response]] | None:
        """The encoding started for the batch about to be sent, if one was."""
        encoding, self._encoding = self._encoding, None
        return encoding

    def follow(self, batch: B | None) -> None:
        """`batch` comes next (None: nothing does): it is encoded once the current one goes."""
        self._following = batch

    def start(self) -> None:
        """The current request was granted: encode the next one, once."""
        if self._following is not None and self._encoding is None and self._in_time():
            self._encoding = self._pool.submit(self._prepare, self._following)
            self._following = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _prepared_first(
    ready: Future[Callable[[], Response]], prepare: Callable[[B], Callable[[], Response]]
) -> Callable[[B], Callable[[], Response]]:
    """`prepare` for `_deliver`, whose first call (the whole batch, `ready` was made from it)
    takes `ready`'s request, or raises what encoding it raised (the SDK's refusal); later calls
    (the parts of a split) prepare their own."""
    used = False

    def first(batch: B) -> Callable[[], Response]:
        nonlocal used
        if used:
            return prepare(batch)
        used = True
        return ready.result()

    return first


def _body(call: PlannedCall, expected_method: str) -> Mapping[str, Any]:
    method, body = call
    if method != expected_method:
        raise ValueError(f"expected a {expected_method!r} call, got {method!r}")
    return body


def _all(count: int, failure: CallFailure) -> list[Outcome]:
    """Every call of a job shares a failure of the job: Pending if transient, else dead."""
    outcome = Pending(failure) if failure.kind is ErrorKind.TRANSIENT else _dead_letter(failure)
    return [outcome] * count


def _named_calls(
    failure: CallFailure, calls_at: Callable[[str], tuple[int, ...]]
) -> dict[int, list[ApiError]]:
    named: dict[int, list[ApiError]] = defaultdict(list)
    for error in failure.errors:
        for index in calls_at(error.pointer):
            named[index].append(error)
    return named


def _dead_letter(failure: CallFailure) -> DeadLetter:
    if failure.kind is ErrorKind.TRANSIENT:
        verdict = "not delivered before the deadline"
    else:
        verdict = "rejected"
    details = "; ".join(error.describe() for error in failure.errors) or failure.summary
    return DeadLetter(f"{verdict} ({failure.label}): {details}", failure)


def _as_duplicate(first: Outcome) -> Outcome:
    if isinstance(first, Delivered):
        return Delivered(DUPLICATE_IN_BATCH)
    if isinstance(first, Pending):
        return first
    reason = f"{DUPLICATE_IN_BATCH} of a dead-lettered event: {first.reason}"
    return DeadLetter(reason, first.failure)


def _import_failure(job_id: str, errors: list[ApiError]) -> CallFailure:
    return CallFailure(
        ErrorKind.PERMANENT,
        "import_error",
        f"import job {job_id} reported {len(errors)} error(s)",
        errors=tuple(errors),
    )
