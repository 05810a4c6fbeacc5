"""What went wrong with a Klaviyo call, and what to do about it.

Every failure of a call becomes one `CallFailure` value with a `kind`:

- TRANSIENT: the same request may succeed later (429, 5xx, timeouts, dropped connections, a
  Cloudflare challenge page, a 2xx page that is not the API's answer: a proxy's or a captive
  portal's HTML). The retry layer retries these until its deadline.
- PERMANENT: this item (or the bulk entry a JSON pointer names) will never be accepted as sent
  (400, 404, 409, 413, client-side validation). It goes to the dead letters.
- CONFIGURATION: nothing will be accepted until a human fixes the API key or its scopes (401, a
  JSON:API 403). The sender raises `KlaviyoConfigurationError` so the job stops loudly instead of
  dead-lettering every event.

The SDK's exceptions are never passed on: their text includes response headers, and the SDK keeps
the request's `Authorization` header nearby. A `CallFailure` holds only what we chose to copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import urllib3.exceptions
from openapi_client.exceptions import ApiException
from pydantic import ValidationError

_SUMMARY_LIMIT = 500


class ErrorKind(Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONFIGURATION = "configuration"


@dataclass(frozen=True)
class ApiError:
    """One JSON:API error object from Klaviyo (or from client-side validation)."""

    code: str = ""
    title: str = ""
    detail: str = ""
    pointer: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        text = self.detail or self.title
        text = f"{self.code}: {text}" if self.code else text
        return f"{text} (at {self.pointer})" if self.pointer else text


@dataclass(frozen=True)
class CallFailure:
    """A classified failure. `label` is the metric status: the HTTP status or a network cause."""

    kind: ErrorKind
    label: str
    summary: str
    status: int | None = None
    errors: tuple[ApiError, ...] = ()
    retry_after: float | None = None


class KlaviyoCallError(Exception):
    """Raised by the client for any failed call; carries the classified, key-free failure."""

    def __init__(self, failure: CallFailure) -> None:
        super().__init__(failure.summary)
        self.failure = failure


class KlaviyoConfigurationError(RuntimeError):
    """The API key is wrong or lacks a scope: stop the job, every further call would fail too."""


class NotKlaviyosAnswer(Exception):
    """A 2xx answer that is not the Klaviyo API's: a body that is not JSON (a proxy's page), or
    not the JSON object the endpoint answers with. Nothing says the request arrived."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"HTTP {status} {what}: not an answer of the Klaviyo API")
        self.status = status


# Exceptions a call can raise that describe the call's fate rather than a bug in our code.
CALL_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ApiException,
    ValidationError,
    NotKlaviyosAnswer,
    urllib3.exceptions.HTTPError,
    OSError,
)


def classify(exc: BaseException) -> CallFailure:
    """Turn an exception from an SDK call (one of CALL_EXCEPTIONS) into a `CallFailure`."""
    if isinstance(exc, ApiException):
        return _classify_http(exc)
    if isinstance(exc, ValidationError):
        return _classify_validation(exc)
    if isinstance(exc, NotKlaviyosAnswer):
        return CallFailure(ErrorKind.TRANSIENT, "unexpected_response", _clip(str(exc)),
                           exc.status)
    if _is_timeout(exc):
        return CallFailure(ErrorKind.TRANSIENT, "timeout", _clip(f"timeout: {exc}"))
    return CallFailure(ErrorKind.TRANSIENT, "connection", _clip(f"{type(exc).__name__}: {exc}"))


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _is_timeout(exc.reason)
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return False  # a refused connection; urllib3 derives it from ConnectTimeoutError
    return isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)


def _classify_http(exc: ApiException) -> CallFailure:
    status = int(exc.status or 0)
    headers = exc.headers or {}
    errors = _json_api_errors(exc.body)
    if status == 0:
        # The SDK reports TLS failures as status 0; a handshake can fail for passing reasons.
        return CallFailure(ErrorKind.TRANSIENT, "tls", _clip(f"TLS error: {exc.reason}"))
    if status == 403 and _is_challenge_page(headers):
        summary = "HTTP 403 Cloudflare challenge page (not from the Klaviyo API)"
        return CallFailure(ErrorKind.TRANSIENT, str(status), summary, status)
    if status == 429:
        kind = ErrorKind.TRANSIENT
        retry_after = _seconds(headers.get("Retry-After"))
    else:
        kind = _kind_of_status(status)
        retry_after = None
    return CallFailure(
        kind, str(status), _http_summary(status, exc.reason, errors), status, errors, retry_after
    )


def _kind_of_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.CONFIGURATION
    if status == 408 or status >= 500:
        return ErrorKind.TRANSIENT
    return ErrorKind.PERMANENT


def _is_challenge_page(headers: Any) -> bool:
    content_type = str(headers.get("Content-Type") or "")
    return bool(headers.get("cf-mitigated")) or content_type.startswith("text/html")


def _seconds(value: Any) -> float | None:
    """Retry-After as seconds; Klaviyo sends integers, anything unparsable counts as absent."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def _json_api_errors(body: str | bytes | None) -> tuple[ApiError, ...]:
    try:
        document = json.loads(body or "")
    except (TypeError, ValueError):
        return ()
    raw_errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(raw_errors, list):
        return ()
    return tuple(api_error(raw) for raw in raw_errors if isinstance(raw, dict))


def api_error(raw: dict[str, Any]) -> ApiError:
    """Read one JSON:API error object (also the shape of a bulk import job's import-error)."""
    source = raw.get("source")
    meta = raw.get("meta")
    return ApiError(
        code=str(raw.get("code") or ""),
        title=str(raw.get("title") or ""),
        detail=str(raw.get("detail") or ""),
        pointer=str(source.get("pointer") or "") if isinstance(source, dict) else "",
        meta=dict(meta) if isinstance(meta, dict) else {},
    )


def _http_summary(status: int, reason: str | None, errors: tuple[ApiError, ...]) -> str:
    if not errors:
        return _clip(f"HTTP {status} {reason or ''}".rstrip())
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return _clip(f"HTTP {status} {errors[0].describe()}{more}")


def _classify_validation(exc: ValidationError) -> CallFailure:
    """The SDK's pydantic check rejected the body before sending it.

    Its error locations use the wire names (`events-bulk-create`), so they become JSON pointers
    that name a bulk entry exactly like a 400 from Klaviyo would.
    """
    errors = tuple(
        ApiError(
            code="invalid_request",
            title=str(item["msg"]),
            detail=str(item["msg"]),
            pointer=_pointer(item["loc"]),
        )
        for item in exc.errors(include_url=False, include_input=False)
    )
    return CallFailure(
        ErrorKind.PERMANENT,
        "invalid_request",
        _clip(f"rejected by the SDK before sending: {errors[0].describe()}"),
        errors=errors,
    )


def _pointer(location: tuple[int | str, ...]) -> str:
    # The first element is the position of the body among the method's arguments.
    path = location[1:] if location and isinstance(location[0], int) else location
    return "".join(f"/{part}" for part in path)


def _clip(text: str) -> str:
    return text if len(text) <= _SUMMARY_LIMIT else text[: _SUMMARY_LIMIT - 1] + "…"
