"""Deliver planned Klaviyo calls and say, per call, what became of it.

The pipeline plans calls as `(method, body)` pairs in wire format. This module sends them:

    plan bulk requests (bulk.py) → rate limiter (rate_limit.py) → SDK call (client.py)
      → on failure: classify (errors.py) → retry transient ones until the deadline (retry.py)

and returns one `Outcome` per call: `Delivered`, or `DeadLetter` with the reason and Klaviyo's
error detail. A bulk request that Klaviyo rejects because of one entry is not lost as a whole:
the entries its JSON pointers name are dead-lettered and the rest is sent again. Configuration
failures (bad key, missing scope) raise `KlaviyoConfigurationError` instead, because every
further call would fail the same way.

Counts go to a `Metrics` callback (the Beam layer binds it to Beam metrics): requests per
endpoint and status, retries, 429s, and request latency.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from transforms.klaviyo.bulk import (
    MAX_EVENTS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    Batch,
    Json,
    ProfileBatch,
    plan_event_batches,
    plan_profile_batches,
)
from transforms.klaviyo.client import KlaviyoClient, Response, next_page_cursor
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


@dataclass(frozen=True)
class Delivered:
    """Klaviyo accepted the call (202/200/201). `note` says why when nothing was sent for it."""

    note: str = ""


@dataclass(frozen=True)
class DeadLetter:
    """Klaviyo will not take the call as it is; `failure` holds its status and error objects."""

    reason: str
    failure: CallFailure


Outcome = Delivered | DeadLetter


class Metrics(Protocol):
    """Where counts go. Names are `<endpoint>_requests_<status>`, `<endpoint>_retries`,
    `<endpoint>_throttled` (429s) and the distribution `<endpoint>_latency_ms`."""

    def count(self, name: str, value: int = 1) -> None: ...

    def observe(self, name: str, value: float) -> None: ...


class NoMetrics:
    """The default: count nothing."""

    def count(self, name: str, value: int = 1) -> None:
        pass

    def observe(self, name: str, value: float) -> None:
        pass


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
        job_poll_seconds: float = 1.0,
        job_timeout_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._retrier = retrier
        self._metrics = metrics or NoMetrics()
        self._max_events = max_events_per_request
        self._max_bytes = max_request_bytes
        self._job_poll_seconds = job_poll_seconds
        self._job_timeout_seconds = job_timeout_seconds
        self._clock = clock
        self._sleep = sleep

    def send_events(self, calls: Sequence[PlannedCall]) -> list[Outcome]:
        """Send `create_event` calls with bulk requests; one outcome per call, in order."""
        bodies = [_body(call, CREATE_EVENT) for call in calls]
        plan = plan_event_batches(bodies, self._max_events, self._max_bytes)
        outcomes: dict[int, Outcome] = {}
        for batch in plan.batches:
            accepted = self._send_batch(
                Endpoint.BULK_EVENTS, batch, self._client.bulk_create_events, outcomes
            )
            if accepted:
                sent, _ = accepted
                outcomes.update(dict.fromkeys(sent.indexes, Delivered()))
        for duplicate, first in plan.duplicates.items():
            outcomes[duplicate] = _as_duplicate(outcomes[first])
        return [outcomes[index] for index in range(len(calls))]

    def send_profile(self, call: PlannedCall) -> Outcome:
        """Send one `create_or_update_profile` call (POST /api/profile-import)."""
        body = _body(call, CREATE_OR_UPDATE_PROFILE)
        result = self._call(
            Endpoint.PROFILE_IMPORT, partial(self._client.create_or_update_profile, body)
        )
        return _dead_letter(result) if isinstance(result, CallFailure) else Delivered()

    def import_profiles(self, calls: Sequence[PlannedCall]) -> list[Outcome]:
        """Upsert many `create_or_update_profile` calls with bulk import jobs (for large syncs).

        Waits for each job to finish and dead-letters the profiles its import errors name.
        Unlike profile-import, a bulk import ignores null values: it cannot clear a field.
        """
        bodies = [_body(call, CREATE_OR_UPDATE_PROFILE) for call in calls]
        outcomes: dict[int, Outcome] = {}
        for batch in plan_profile_batches(bodies, max_bytes=self._max_bytes):
            accepted = self._send_batch(
                Endpoint.BULK_PROFILE_IMPORT, batch, self._client.bulk_import_profiles, outcomes
            )
            if accepted:
                sent, response = accepted
                outcomes.update(self._import_job_outcomes(sent, str(response.data["data"]["id"])))
        return [outcomes[index] for index in range(len(calls))]

    def _send_batch(
        self,
        endpoint: Endpoint,
        batch: B,
        send: Callable[[Json], Response],
        outcomes: dict[int, Outcome],
    ) -> tuple[B, Response] | None:
        """Send a bulk request; return the part Klaviyo accepted and its response.

        Calls that a rejection's JSON pointers name are dead-lettered into `outcomes` and the
        rest is sent again. If a failure names no entry, every call still pending shares it.
        """
        pending: B | None = batch
        while pending is not None:
            result = self._call(endpoint, partial(send, pending.body()))
            if not isinstance(result, CallFailure):
                return pending, result
            permanent = result.kind is ErrorKind.PERMANENT
            named = _named_calls(result, pending.calls_at) if permanent else {}
            if not named:
                outcomes.update(dict.fromkeys(pending.indexes, _dead_letter(result)))
                return None
            for index, errors in named.items():
                outcomes[index] = _dead_letter(replace(result, errors=tuple(errors)))
            pending = pending.without(named)
        return None

    def _import_job_outcomes(self, batch: ProfileBatch, job_id: str) -> dict[int, Outcome]:
        """Wait for an accepted import job; its import errors name the profiles it rejected."""
        failure = self._await_job(job_id)
        errors = self._import_errors(job_id) if failure is None else failure
        if isinstance(errors, CallFailure):
            return dict.fromkeys(batch.indexes, _dead_letter(errors))
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
        return {
            index: _dead_letter(_import_failure(job_id, named[index]))
            if index in named
            else Delivered()
            for index in batch.indexes
        }

    def _await_job(self, job_id: str) -> CallFailure | None:
        """Poll a bulk import job until it is complete (None), or say why it never will be."""
        deadline = self._clock() + self._job_timeout_seconds
        while True:
            result = self._call(
                Endpoint.IMPORT_JOBS, partial(self._client.get_bulk_import_job, job_id)
            )
            if isinstance(result, CallFailure):
                return result
            status = str(result.data["data"]["attributes"]["status"])
            if status == "complete":
                return None
            if status == "cancelled":
                return CallFailure(
                    ErrorKind.PERMANENT, status, f"import job {job_id} was cancelled"
                )
            if self._clock() + self._job_poll_seconds > deadline:
                return CallFailure(
                    ErrorKind.TRANSIENT,
                    "job_timeout",
                    f"import job {job_id} still {status} after {self._job_timeout_seconds:g} s;"
                    " its outcome is unknown",
                )
            self._sleep(self._job_poll_seconds)

    def _import_errors(self, job_id: str) -> list[tuple[ApiError, Json]] | CallFailure:
        """All import errors of a finished job, with the profile each one was about."""
        errors: list[tuple[ApiError, Json]] = []
        cursor: str | None = None
        while True:
            result = self._call(
                Endpoint.IMPORT_JOBS, partial(self._client.get_import_errors, job_id, cursor)
            )
            if isinstance(result, CallFailure):
                return result
            for resource in result.data.get("data") or []:
                attributes = resource.get("attributes") or {}
                errors.append((api_error(attributes), attributes.get("original_payload") or {}))
            cursor = next_page_cursor(result)
            if cursor is None:
                return errors

    def _call(self, endpoint: Endpoint, request: Callable[[], Response]) -> Response | CallFailure:
        """One logical request: rate-limited, timed, counted and retried.

        Raises `KlaviyoConfigurationError` when the key is refused.
        """

        def attempt() -> Response:
            granted_at = self._limiter.acquire(endpoint)
            started = self._clock()
            try:
                result = request()
            except KlaviyoCallError as exc:
                self._count_request(endpoint, exc.failure.label, started)
                if exc.failure.status == 429:
                    self._metrics.count(f"{endpoint}_throttled")
                    self._limiter.throttled(endpoint, exc.failure.retry_after, granted_at)
                raise
            self._count_request(endpoint, str(result.status), started)
            self._limiter.succeeded(endpoint)
            return result

        def retrying(failure: CallFailure) -> None:
            self._metrics.count(f"{endpoint}_retries")
            log.info("%s: retrying after %s", endpoint, failure.summary)

        result = self._retrier.run(attempt, on_retry=retrying)
        if isinstance(result, CallFailure) and result.kind is ErrorKind.CONFIGURATION:
            raise KlaviyoConfigurationError(
                f"Klaviyo refused the API key ({result.summary}). Check that it is a private key "
                "of this account with the profiles:write and events:write scopes."
            )
        return result

    def _count_request(self, endpoint: Endpoint, status: str, started: float) -> None:
        self._metrics.count(f"{endpoint}_requests_{status}")
        self._metrics.observe(f"{endpoint}_latency_ms", (self._clock() - started) * 1000)


def _body(call: PlannedCall, expected_method: str) -> Mapping[str, Any]:
    method, body = call
    if method != expected_method:
        raise ValueError(f"expected a {expected_method!r} call, got {method!r}")
    return body


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
    reason = f"{DUPLICATE_IN_BATCH} of a dead-lettered event: {first.reason}"
    return DeadLetter(reason, first.failure)


def _import_failure(job_id: str, errors: list[ApiError]) -> CallFailure:
    return CallFailure(
        ErrorKind.PERMANENT,
        "import_error",
        f"import job {job_id} reported {len(errors)} error(s)",
        errors=tuple(errors),
    )
