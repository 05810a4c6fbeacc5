"""A local Klaviyo API for tests: real HTTP, Klaviyo's rules, the final state, and faults.

The official SDK is pointed at it with `test_host=server.url`. It implements the endpoints the
delivery layer calls, validates bodies the way Klaviyo does (and answers with JSON:API errors whose
`source.pointer` names the bad item), enforces per-endpoint rate limits in fixed windows, and keeps
what Klaviyo would keep: events deduplicated by (profile, metric, unique_id) with repeats silently
ignored, profiles upserted by their identifiers.

Faults are queued per route with `inject` and used up one per request, in order. "drop after
write" stores the data and then closes the connection without an answer: the client sees a
connection error and retries, which is how idempotency is proven. `poison` makes every request
that carries a given event or profile fail for ever (a payload Klaviyo keeps choking on), and
`latency_seconds` delays every answer (real Klaviyo takes hundreds of milliseconds).

`log` records every request in the order its answer was decided (`seq`), with what it carried
(unique_ids, profile identifiers, the import job asked about) and when it arrived on the
server's scaled clock (`at`, in Klaviyo seconds), so tests can check ordering and rates.

Usage: `pytest_plugins = ["tests.conftest_klaviyo"]` in a test module gives it the
`klaviyo_server` fixture (started on a free port, stopped after the test); or use
`with KlaviyoTestServer(...) as server:`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson

BULK_EVENTS = "POST /api/event-bulk-create-jobs"
EVENTS = "POST /api/events"
PROFILE_IMPORT = "POST /api/profile-import"
GET_PROFILES = "GET /api/profiles"
BULK_PROFILE_IMPORT = "POST /api/profile-bulk-import-jobs"
IMPORT_JOB = "GET /api/profile-bulk-import-jobs/{id}"
IMPORT_ERRORS = "GET /api/profile-bulk-import-jobs/{id}/import-errors"

# Klaviyo's published (burst per second, steady per minute) limits.
RATE_LIMITS: dict[str, tuple[int, int]] = {
    BULK_EVENTS: (10, 150),
    EVENTS: (350, 3500),
    PROFILE_IMPORT: (75, 750),
    GET_PROFILES: (75, 700),
    BULK_PROFILE_IMPORT: (10, 150),
    IMPORT_JOB: (10, 150),
    IMPORT_ERRORS: (10, 150),
}

MAX_BULK_EVENTS = 1000
MAX_BULK_PROFILES = 10_000
MAX_PAYLOAD_BYTES = 5 * 1024 * 1024
MAX_METRIC_NAME = 127
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
IDENTIFIERS = ("email", "phone_number", "external_id")
EVENT_PROFILE_IDENTIFIERS = (*IDENTIFIERS, "anonymous_id", "_kx")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_JOB_ROUTE = re.compile(r"^/api/profile-bulk-import-jobs/([^/]+)(/import-errors)?$")
_JOB_STATES = ("queued", "processing", "complete")

Json = dict[str, Any]


@dataclass(frozen=True)
class Fault:
    """One programmed misbehaviour, used up by the next request to its route."""

    kind: str
    status: int = 0
    seconds: float = 0.0

    @classmethod
    def error(cls, status: int) -> Fault:
        """Answer with this 5xx status and a JSON:API error, storing nothing."""
        return cls("error", status=status)

    @classmethod
    def throttle(cls, retry_after: int = 1) -> Fault:
        """Answer 429 with `Retry-After: retry_after` (whole seconds, as Klaviyo sends)."""
        return cls("throttle", status=429, seconds=retry_after)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Store the data, then wait `seconds` before answering (client read timeouts)."""
        return cls("slow", seconds=seconds)

    @classmethod
    def drop_after_write(cls) -> Fault:
        """Store the data, then close the connection without answering."""
        return cls("drop")

    @classmethod
    def forbidden(cls) -> Fault:
        """A JSON:API 403, as for a key without the needed scope."""
        return cls("forbidden", status=403)

    @classmethod
    def challenge(cls) -> Fault:
        """An HTML 403 Cloudflare challenge page with `cf-mitigated: challenge`."""
        return cls("challenge", status=403)

    @classmethod
    def html_page(cls) -> Fault:
        """A 200 with an HTML page instead of Klaviyo's answer (a proxy or captive portal),
        storing nothing."""
        return cls("html_page", status=200)


@dataclass(frozen=True)
class LoggedRequest:
    seq: int  # order in which answers were decided
    at: float  # arrival on the server's clock, in Klaviyo seconds (`time_scale` applied)
    route: str
    status: int | None  # None: the connection was dropped without an answer
    events: int  # events in a bulk events request
    size: int  # body bytes as received
    unique_ids: tuple[str, ...] = ()  # of the events in the body
    profiles: tuple[str, ...] = ()  # email (else external_id) of each profile in the body
    job_id: str = ""  # the import job a GET asked about, or a bulk import created
    job_status: str = ""  # the status answered for it


@dataclass
class StoredEvent:
    profile_id: str
    metric: str
    unique_id: str | None
    attributes: Json


@dataclass
class _Job:
    job_id: str
    total: int
    errors: list[Json]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    polls: int = 0


@dataclass
class _Answer:
    status: int
    body: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Rejected(Exception):
    """A request Klaviyo would refuse as a whole."""

    def __init__(self, status: int, errors: list[Json]) -> None:
        super().__init__(status)
        self.answer = _Answer(status, {"errors": errors})


_ids = itertools.count(1)  # error, profile and job ids


def _error(
    status: int, code: str, title: str, detail: str, pointer: str = "/data", **meta: Any
) -> Json:
    return {
        "id": f"err-{next(_ids)}",
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
        "source": {"pointer": pointer},
        "links": {},
        "meta": meta,
    }


class KlaviyoTestServer:
    """The server state and behaviour; the HTTP part is `_Handler`."""

    def __init__(
        self,
        api_key: str = "pk_test_0123456789abcdef",
        *,
        time_scale: float = 1.0,
        latency_seconds: float = 0.0,
    ):
        self.api_key = api_key
        self.time_scale = time_scale  # Klaviyo seconds per real second
        self.latency_seconds = latency_seconds  # real seconds before every answer
        self.rate_limits: dict[str, tuple[int, int]] = dict(RATE_LIMITS)
        self.events: dict[tuple[str, str, str], StoredEvent] = {}
        self.profiles: dict[str, Json] = {}
        self.log: list[LoggedRequest] = []
        self.events_received = 0  # every event in an accepted request, repeats included
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._poisoned: set[str] = set()
        self._seq = itertools.count(1)
        self._windows: dict[tuple[str, float], tuple[int, int]] = {}
        self._profile_by_identifier: dict[tuple[str, str], str] = {}
        self._jobs: dict[str, _Job] = {}
        self._http: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> KlaviyoTestServer:
        self._http = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._http.app = self
        serve = partial(self._http.serve_forever, poll_interval=0.05)  # quick to stop
        threading.Thread(target=serve, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> KlaviyoTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._http is not None, "the server is not running"
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    # --- test controls and assertions ------------------------------------------------------

    def inject(self, route: str, *faults: Fault) -> None:
        """Queue faults for a route (e.g. `BULK_EVENTS`); each request uses up the next one."""
        with self._lock:
            self._faults[route].extend(faults)

    def clear_faults(self) -> None:
        """Drop the faults and poison: the server behaves again."""
        with self._lock:
            self._faults.clear()
            self._poisoned.clear()

    def poison(self, *marks: str) -> None:
        """Answer 500 (storing nothing) to every request that carries an event with one of these
        unique_ids or a profile with one of these emails or external_ids, for ever."""
        with self._lock:
            self._poisoned.update(marks)

    def requests(self, route: str | None = None) -> list[LoggedRequest]:
        """A copy of the log (of one route), in `seq` order."""
        with self._lock:
            return [entry for entry in self.log if route is None or entry.route == route]

    def statuses(self, route: str) -> list[int | None]:
        with self._lock:
            return [entry.status for entry in self.log if entry.route == route]

    def stored_unique_ids(self) -> list[str | None]:
        with self._lock:
            return [event.unique_id for event in self.events.values()]

    def profile(self, **identifier: str) -> Json | None:
        """The stored attributes of the profile with this identifier, e.g. `email="a@b.co"`."""
        ((key, value),) = identifier.items()
        with self._lock:
            profile_id = self._profile_by_identifier.get((key, value))
            return None if profile_id is None else dict(self.profiles[profile_id])

    # --- request handling ------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[_Answer, Fault]:
        """Decide the answer to one request and log it; the handler carries out slow/drop
        faults and the latency."""
        arrived = time.monotonic() * self.time_scale
        route, job_id = _route(method, urlsplit(path).path)
        document = _parse(raw)  # once: bodies of 1000 events are costly to read
        events, unique_ids, profiles = _contents(route, document)
        answer, fault = self._decide(route, job_id, path, headers, raw, document,
                                     unique_ids + profiles)
        if route == BULK_PROFILE_IMPORT and answer.status == 202:
            job_id = str(_dig(answer.body, "data", "id"))
        job_status = _dig(answer.body, "data", "attributes", "status") if job_id else ""
        with self._lock:
            self.log.append(
                LoggedRequest(
                    next(self._seq), arrived, route,
                    None if fault.kind == "drop" else answer.status,
                    len(events) if route == BULK_EVENTS else 0, len(raw),
                    unique_ids, profiles, job_id, str(job_status or ""),
                )
            )
        return answer, fault

    def _decide(
        self, route: str, job_id: str, path: str, headers: Any, raw: bytes, document: Any,
        marks: tuple[str, ...],
    ) -> tuple[_Answer, Fault]:
        if headers.get("Authorization") != f"Klaviyo-API-Key {self.api_key}":
            return _answer_error(401, "not_authenticated", "Incorrect authentication."), _NO
        with self._lock:
            fault = self._faults[route].popleft() if self._faults[route] else _NO
        if fault.kind in _ANSWERING_FAULTS:
            return _ANSWERING_FAULTS[fault.kind](fault), fault
        throttled = self._throttle(route)
        if throttled is not None:
            return throttled, fault
        if self._is_poisoned(marks):
            return _answer_error(500, "error", "A server error occurred."), fault
        try:
            answer = self._dispatch(route, job_id, raw, document, parse_qs(urlsplit(path).query))
        except _Rejected as rejected:
            answer = rejected.answer
        return answer, fault

    def _is_poisoned(self, marks: tuple[str, ...]) -> bool:
        """Whether the request carries a poisoned unique_id or profile (`poison`)."""
        with self._lock:
            return not self._poisoned.isdisjoint(marks)

    def _dispatch(
        self, route: str, job_id: str, raw: bytes, document: Any, query: dict[str, list[str]]
    ) -> _Answer:
        if route == BULK_EVENTS:
            return self._bulk_events(_document(raw, document))
        if route == EVENTS:
            return self._event(_document(raw, document))
        if route == PROFILE_IMPORT:
            return self._profile_import(_document(raw, document))
        if route == GET_PROFILES:
            return self._get_profiles()
        if route == BULK_PROFILE_IMPORT:
            return self._bulk_profile_import(_document(raw, document))
        if route == IMPORT_JOB:
            return self._job_status(job_id)
        if route == IMPORT_ERRORS:
            return self._import_errors(job_id, query)
        return _answer_error(404, "not_found", f"No route {route}.")

    def _throttle(self, route: str) -> _Answer | None:
        """Fixed windows, as Klaviyo counts: `burst` per second and `steady` per minute."""
        limits = self.rate_limits.get(route)
        if limits is None:
            return None
        now = time.monotonic() * self.time_scale  # in Klaviyo seconds
        windows = [
            (limit, seconds, math.floor(now / seconds))
            for limit, seconds in zip(limits, (1.0, 60.0), strict=True)
        ]
        with self._lock:
            counts = [self._count_in(route, seconds, index) for _, seconds, index in windows]
            for (limit, seconds, index), count in zip(windows, counts, strict=True):
                if count >= limit:
                    real_wait = ((index + 1) * seconds - now) / self.time_scale
                    return _answer_throttled(max(1, math.ceil(real_wait)))
            for (_, seconds, index), count in zip(windows, counts, strict=True):
                self._windows[(route, seconds)] = (index, count + 1)
        return None

    def _count_in(self, route: str, seconds: float, index: int) -> int:
        counted_index, count = self._windows.get((route, seconds), (index, 0))
        return count if counted_index == index else 0

    # --- events ------------------------------------------------------------------------------

    def _bulk_events(self, document: Json) -> _Answer:
        root = "/data/attributes/events-bulk-create/data"
        data = _require(document, "data", dict, "/data")
        if data.get("type") != "event-bulk-create-job":
            raise _invalid("/data/type", "Expected type 'event-bulk-create-job'.")
        entries = _dig(data, "attributes", "events-bulk-create", "data")
        if not isinstance(entries, list):
            raise _invalid(root, "A list of 'event-bulk-create' objects is required.")
        if _events_in(entries) > MAX_BULK_EVENTS:
            raise _invalid(root, f"At most {MAX_BULK_EVENTS} events per request.")
        errors: list[Json] = []
        accepted: list[tuple[Json, Json]] = []
        seen: set[tuple[str, str, str]] = set()
        for i, entry in enumerate(entries):
            pointer = f"{root}/{i}"
            attributes = entry.get("attributes") if isinstance(entry, dict) else None
            if (
                not isinstance(entry, dict)
                or entry.get("type") != "event-bulk-create"
                or not isinstance(attributes, dict)
            ):
                errors.append(_invalid_error(pointer, "Expected an 'event-bulk-create' object."))
                continue
            profile = _profile_attributes(attributes, f"{pointer}/attributes/profile", errors)
            events = _dig(attributes, "events", "data")
            if not isinstance(events, list) or not events:
                errors.append(_invalid_error(f"{pointer}/attributes/events", "Events required."))
                continue
            for j, event in enumerate(events):
                event_pointer = f"{pointer}/attributes/events/data/{j}"
                if not isinstance(event, dict) or event.get("type") != "event":
                    errors.append(_invalid_error(event_pointer, "Expected an 'event' object."))
                    continue
                event_attributes = _event_attributes(event, event_pointer, errors)
                if profile is None or event_attributes is None:
                    continue
                key = _repeat_key(profile, event_attributes)
                if key is not None and key in seen:
                    errors.append(
                        _invalid_error(
                            f"{event_pointer}/attributes/unique_id",
                            "A unique_id is repeated for the same profile and metric.",
                        )
                    )
                    continue
                if key is not None:
                    seen.add(key)
                accepted.append((profile, event_attributes))
        if errors:
            return _Answer(400, {"errors": errors})
        with self._lock:
            for profile, event_attributes in accepted:
                self._store_event(profile, event_attributes)
        return _Answer(202)

    def _event(self, document: Json) -> _Answer:
        data = _require(document, "data", dict, "/data")
        errors: list[Json] = []
        attributes = _event_attributes(data, "/data", errors)
        profile = _profile_attributes(
            _require(data, "attributes", dict, "/data/attributes"),
            "/data/attributes/profile",
            errors,
        )
        if errors or attributes is None or profile is None:
            return _Answer(400, {"errors": errors})
        with self._lock:
            self._store_event(profile, attributes)
        return _Answer(202)

    def _store_event(self, profile: Json, attributes: Json) -> None:
        """Keep the first event per (profile, metric, unique_id or second); ignore repeats."""
        profile_id, _ = self._upsert(profile, nulls_clear=False)
        metric = attributes["metric"]["data"]["attributes"]["name"]
        unique_id = attributes.get("unique_id")
        second = _parse_time(attributes["time"]).replace(microsecond=0).isoformat()
        key = (profile_id, metric, unique_id if unique_id is not None else second)
        self.events_received += 1
        self.events.setdefault(key, StoredEvent(profile_id, metric, unique_id, attributes))

    # --- profiles ----------------------------------------------------------------------------

    def _get_profiles(self) -> _Answer:
        """GET /api/profiles (first page): the cheap read the launch-time key check makes."""
        with self._lock:
            first = next(iter(self.profiles.items()), None)
        data = [] if first is None else [{
            "type": "profile", "id": first[0], "attributes": first[1],
            "links": {"self": f"https://a.klaviyo.com/api/profiles/{first[0]}/"},
        }]
        base = "https://a.klaviyo.com/api/profiles/"
        return _Answer(200, {"data": data, "links": {"self": base, "next": None, "prev": None}})

    def _profile_import(self, document: Json) -> _Answer:
        data = _require(document, "data", dict, "/data")
        if data.get("type") != "profile":
            raise _invalid("/data/type", "Expected type 'profile'.")
        attributes = _require(data, "attributes", dict, "/data/attributes")
        errors = _identifier_errors(attributes, "/data/attributes")
        if errors:
            return _Answer(400, {"errors": errors})
        with self._lock:
            conflict = self._conflict(attributes)
            if conflict is not None:
                return _answer_error(
                    409,
                    "duplicate_profile",
                    "A profile already exists with one of these identifiers.",
                    duplicate_profile_id=conflict,
                )
            profile_id, created = self._upsert(attributes, nulls_clear=True)
            stored = dict(self.profiles[profile_id])
        body = {
            "data": {
                "type": "profile",
                "id": profile_id,
                "attributes": stored,
                "links": {"self": f"https://a.klaviyo.com/api/profiles/{profile_id}/"},
            }
        }
        return _Answer(201 if created else 200, body)

    def _bulk_profile_import(self, document: Json) -> _Answer:
        root = "/data/attributes/profiles/data"
        data = _require(document, "data", dict, "/data")
        if data.get("type") != "profile-bulk-import-job":
            raise _invalid("/data/type", "Expected type 'profile-bulk-import-job'.")
        profiles = _dig(data, "attributes", "profiles", "data")
        if not isinstance(profiles, list):
            raise _invalid(root, "A list of 'profile' objects is required.")
        if len(profiles) > MAX_BULK_PROFILES:
            raise _invalid(root, f"At most {MAX_BULK_PROFILES} profiles per request.")
        structural = [
            _invalid_error(f"{root}/{i}", "Expected a 'profile' object with attributes.")
            for i, profile in enumerate(profiles)
            if not isinstance(profile, dict)
            or profile.get("type") != "profile"
            or not isinstance(profile.get("attributes"), dict)
        ]
        if structural:
            return _Answer(400, {"errors": structural})
        job_errors: list[Json] = []
        with self._lock:
            for profile in profiles:
                attributes = profile["attributes"]
                problems = _identifier_errors(attributes, "/data/attributes")
                if problems:
                    job_errors.extend(
                        {**problem, "original_payload": attributes} for problem in problems
                    )
                else:
                    self._upsert(attributes, nulls_clear=False)  # bulk import ignores nulls
            job_id = f"job-{next(_ids)}"
            self._jobs[job_id] = _Job(job_id, len(profiles), job_errors)
        return _Answer(202, _job_body(self._jobs[job_id], "queued"))

    def _job_status(self, job_id: str) -> _Answer:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return _answer_error(404, "not_found", f"No import job {job_id}.")
            job.polls += 1
            status = _JOB_STATES[min(job.polls, len(_JOB_STATES) - 1)]
        return _Answer(200, _job_body(job, status))

    def _import_errors(self, job_id: str, query: dict[str, list[str]]) -> _Answer:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return _answer_error(404, "not_found", f"No import job {job_id}.")
        start = int(query.get("page[cursor]", ["0"])[0])
        size = int(query.get("page[size]", ["20"])[0])
        page = job.errors[start : start + size]
        data = [
            {
                "type": "import-error",
                "id": error["id"],
                "attributes": {
                    "code": error["code"],
                    "title": error["title"],
                    "detail": error["detail"],
                    "source": error["source"],
                    "original_payload": error["original_payload"],
                },
            }
            for error in page
        ]
        base = f"https://a.klaviyo.com/api/profile-bulk-import-jobs/{job_id}/import-errors"
        more = start + size < len(job.errors)
        next_link = f"{base}?{urlencode({'page[cursor]': start + size})}" if more else None
        return _Answer(200, {"data": data, "links": {"self": base, "next": next_link}})

    def _conflict(self, attributes: Json) -> str | None:
        """Another profile's id when the identifiers name two different profiles."""
        matches = self._matches(attributes)
        return matches[1] if len(matches) > 1 else None

    def _matches(self, attributes: Json) -> list[str]:
        found: list[str] = []
        for key in EVENT_PROFILE_IDENTIFIERS:
            value = attributes.get(key)
            profile_id = self._profile_by_identifier.get((key, value)) if value else None
            if profile_id is not None and profile_id not in found:
                found.append(profile_id)
        return found

    def _upsert(self, attributes: Json, *, nulls_clear: bool) -> tuple[str, bool]:
        """Find the profile by identifiers (or create it) and merge the attributes into it."""
        matches = self._matches(attributes)
        created = not matches
        profile_id = f"01PROFILE{next(_ids):08d}" if created else matches[0]
        stored = self.profiles.setdefault(profile_id, {})
        for key, value in attributes.items():
            if isinstance(value, dict) and key in ("properties", "location"):
                merged = {**stored.get(key, {}), **value}
                stored[key] = {k: v for k, v in merged.items() if v is not None or not nulls_clear}
            elif value is None:
                if nulls_clear:
                    stored.pop(key, None)
            else:
                stored[key] = value
        for key in EVENT_PROFILE_IDENTIFIERS:
            if stored.get(key) is not None:
                self._profile_by_identifier[(key, stored[key])] = profile_id
        return profile_id, created


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 resets connections under load
    app: KlaviyoTestServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    disable_nagle_algorithm = True  # else ~40 ms per answer (Nagle + delayed ACK)
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        self._serve(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `server.log` instead."""

    def _serve(self, raw: bytes) -> None:
        app = self.server.app
        answer, fault = app.handle(self.command, self.path, self.headers, raw)
        if fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        time.sleep(app.latency_seconds + (fault.seconds if fault.kind == "slow" else 0.0))
        self._answer(answer)

    def _answer(self, answer: _Answer) -> None:
        if answer.headers.get("Content-Type", "").startswith("text/html"):
            payload = _CHALLENGE_PAGE
        else:
            payload = b"" if answer.body is None else json.dumps(answer.body).encode()
        try:
            self.send_response(answer.status)
            headers = {"Content-Type": "application/vnd.api+json", **answer.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting (a read timeout)


# --- answers ---------------------------------------------------------------------------------

_NO = Fault("none")
_CHALLENGE_PAGE = b"<!DOCTYPE html><html><head><title>Just a moment...</title></head></html>"


def _answer_error(status: int, code: str, detail: str, **meta: Any) -> _Answer:
    titles = {
        401: "Authentication error.",
        403: "Permission denied.",
        404: "Not found.",
        409: "Conflict.",
        413: "Payload too large.",
    }
    title = titles.get(status, "Server error.")
    return _Answer(status, {"errors": [_error(status, code, title, detail, **meta)]})


def _answer_throttled(retry_after: int) -> _Answer:
    error = _error(
        429,
        "throttled",
        "Request was throttled.",
        f"Request was throttled. Expected available in {retry_after} second.",
    )
    error["links"] = {
        "type": "https://developers.klaviyo.com/en/docs/rate_limits_and_error_handling"
    }
    return _Answer(429, {"errors": [error]}, {"Retry-After": str(retry_after)})


_ANSWERING_FAULTS: dict[str, Callable[[Fault], _Answer]] = {
    "error": lambda fault: _answer_error(fault.status, "error", "A server error occurred."),
    "throttle": lambda fault: _answer_throttled(int(fault.seconds)),
    "forbidden": lambda fault: _answer_error(
        403, "permission_denied", "You do not have permission to perform this action."
    ),
    "challenge": lambda fault: _Answer(
        403, None, {"Content-Type": "text/html; charset=UTF-8", "cf-mitigated": "challenge"}
    ),
    "html_page": lambda fault: _Answer(200, None, {"Content-Type": "text/html; charset=UTF-8"}),
}


def _job_body(job: _Job, status: str) -> Json:
    done = status == "complete"
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "id": job.job_id,
            "attributes": {
                "status": status,
                "created_at": job.created_at,
                "completed_at": job.created_at if done else None,
                "total_count": job.total,
                "completed_count": job.total - len(job.errors) if done else 0,
                "failed_count": len(job.errors) if done else 0,
            },
            "links": {"self": f"https://a.klaviyo.com/api/profile-bulk-import-jobs/{job.job_id}/"},
        }
    }


# --- validation ------------------------------------------------------------------------------


def _invalid_error(pointer: str, detail: str) -> Json:
    return _error(400, "invalid", "Invalid input.", detail, pointer)


def _invalid(pointer: str, detail: str) -> _Rejected:
    return _Rejected(400, [_invalid_error(pointer, detail)])


_UNREADABLE = object()  # a body that is not JSON
_LONG_NUMBER = re.compile(rb"\d{19}")  # any integer beyond 64 bits has 19 digits or more


def _parse(raw: bytes) -> Any:
    """The body as the standard library reads it; orjson first, because at limits scaled ×10
    the server parses 25 bulk bodies of 1000 events a second; a body orjson refuses (NaN, lone
    surrogates, bad JSON) or could read otherwise (an integer over 64 bits) gets the standard
    library's answer."""
    if not raw:
        return _UNREADABLE
    if not _LONG_NUMBER.search(raw):  # orjson reads an integer beyond 64 bits as a float
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(raw)
    except ValueError:
        return _UNREADABLE


def _document(raw: bytes, document: Any) -> Json:
    """The parsed body as Klaviyo would take it, or the error it would answer."""
    if len(raw) >= MAX_PAYLOAD_BYTES:
        raise _Rejected(
            413,
            [
                _error(
                    413,
                    "too_large",
                    "Payload too large.",
                    f"The payload is {len(raw)} bytes, over 5 MB.",
                )
            ],
        )
    if document is _UNREADABLE:
        raise _invalid("/", "The body is not valid JSON.")
    if not isinstance(document, dict):
        raise _invalid("/", "The body must be a JSON object.")
    return document


def _require(parent: Json, key: str, kind: type, pointer: str) -> Any:
    value = parent.get(key)
    if not isinstance(value, kind):
        raise _invalid(pointer, f"'{key}' is required.")
    return value


def _profile_attributes(attributes: Json, pointer: str, errors: list[Json]) -> Json | None:
    """The event's profile attributes, if it has at least one valid identifier."""
    data = _dig(attributes, "profile", "data")
    profile = _dig(data, "attributes")
    if not isinstance(profile, dict) or data.get("type") != "profile":
        errors.append(_invalid_error(pointer, "A profile is required."))
        return None
    problems = _identifier_errors(
        profile, f"{pointer}/data/attributes", EVENT_PROFILE_IDENTIFIERS, has_id="id" in data
    )
    errors.extend(problems)
    return None if problems else profile


def _identifier_errors(
    attributes: Json,
    pointer: str,
    identifiers: tuple[str, ...] = IDENTIFIERS,
    has_id: bool = False,
) -> list[Json]:
    if not has_id and not any(attributes.get(key) for key in identifiers):
        return [_invalid_error(pointer, f"One of {', '.join(identifiers)} is required.")]
    problems = []
    for key in identifiers:
        value = attributes.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(_invalid_error(f"{pointer}/{key}", f"'{key}' must be a string."))
    email, phone = attributes.get("email"), attributes.get("phone_number")
    if isinstance(email, str) and not _EMAIL.match(email):
        problems.append(_invalid_error(f"{pointer}/email", "Invalid email address."))
    if isinstance(phone, str) and not _E164.match(phone):
        problems.append(_invalid_error(f"{pointer}/phone_number", "Invalid phone number."))
    return problems


def _event_attributes(event: Json, pointer: str, errors: list[Json]) -> Json | None:
    """The event's attributes if Klaviyo would accept them; else the reasons go to `errors`."""
    attributes = event.get("attributes")
    if not isinstance(attributes, dict):
        errors.append(_invalid_error(f"{pointer}/attributes", "Attributes are required."))
        return None
    pointer = f"{pointer}/attributes"
    found: list[Json] = []
    name = _dig(attributes, "metric", "data", "attributes", "name")
    if not isinstance(name, str) or not name or len(name) > MAX_METRIC_NAME:
        found.append(
            _invalid_error(
                f"{pointer}/metric/data/attributes/name",
                "A metric name of 1 to 127 characters is required.",
            )
        )
    if not isinstance(attributes.get("properties"), dict):
        found.append(_invalid_error(f"{pointer}/properties", "'properties' is required."))
    try:
        moment = _parse_time(attributes.get("time"))
    except (TypeError, ValueError):
        found.append(_invalid_error(f"{pointer}/time", "'time' must be an ISO 8601 datetime."))
    else:
        if not EARLIEST_TIME <= moment <= datetime.now(UTC) + timedelta(days=365):
            found.append(
                _invalid_error(
                    f"{pointer}/time", "'time' must be after 2000 and at most one year ahead."
                )
            )
    value = attributes.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        found.append(_invalid_error(f"{pointer}/value", "'value' must be a number."))
    unique_id = attributes.get("unique_id")
    if unique_id is not None and not isinstance(unique_id, str):
        found.append(_invalid_error(f"{pointer}/unique_id", "'unique_id' must be a string."))
    errors.extend(found)
    return None if found else attributes


def _parse_time(value: Any) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _repeat_key(profile: Json, attributes: Json) -> tuple[str, str, str] | None:
    unique_id = attributes.get("unique_id")
    if unique_id is None:
        return None
    identifiers = {key: profile.get(key) for key in EVENT_PROFILE_IDENTIFIERS}
    try:
        identity = orjson.dumps(identifiers, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # what orjson cannot write (lone surrogates)
        identity = json.dumps(identifiers, sort_keys=True)
    return identity, attributes["metric"]["data"]["attributes"]["name"], unique_id


def _dig(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...`, or None where the structure is not what Klaviyo expects."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _events_in(entries: Any) -> int:
    if not isinstance(entries, list):
        return 0
    counts = (_dig(entry, "attributes", "events", "data") for entry in entries)
    return sum(len(events) for events in counts if isinstance(events, list))


def _contents(route: str, document: Any) -> tuple[list[Any], tuple[str, ...], tuple[str, ...]]:
    """The events, their unique_ids and the email (else external_id) of the profiles in a
    parsed request body, in order; empty for anything unreadable."""
    data = _dig(document, "data")
    if route == BULK_EVENTS:
        entries = _dig(data, "attributes", "events-bulk-create", "data")
        entries = entries if isinstance(entries, list) else []
        profiles = [_dig(entry, "attributes", "profile", "data", "attributes") for entry in entries]
        events = [
            event
            for entry in entries
            for event in (_dig(entry, "attributes", "events", "data") or [])
        ]
    elif route == EVENTS:
        profiles = [_dig(data, "attributes", "profile", "data", "attributes")]
        events = [data]
    elif route == PROFILE_IMPORT:
        profiles, events = [_dig(data, "attributes")], []
    elif route == BULK_PROFILE_IMPORT:
        listed = _dig(data, "attributes", "profiles", "data")
        profiles = [_dig(profile, "attributes") for profile in listed or []]
        events = []
    else:
        return [], (), ()
    unique_ids = (_dig(event, "attributes", "unique_id") for event in events)
    names = (_dig(profile, "email") or _dig(profile, "external_id") for profile in profiles)
    return (
        events,
        tuple(str(value) for value in unique_ids if value is not None),
        tuple(str(value) for value in names if value is not None),
    )


def _route(method: str, path: str) -> tuple[str, str]:
    """The route template of a request and the job id in its path, if any."""
    match = _JOB_ROUTE.match(path)
    if method == "GET" and match:
        return (IMPORT_ERRORS if match[2] else IMPORT_JOB), match[1]
    return f"{method} {path.rstrip('/')}", ""
