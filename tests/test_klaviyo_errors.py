"""Classification of every way a Klaviyo call can fail."""

from __future__ import annotations

import json
from typing import Any

import pytest
import urllib3
from openapi_client.exceptions import ApiException
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.errors import ErrorKind, KlaviyoCallError, classify

JSON_API = "application/vnd.api+json"


def api_exception(
    status: int, errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None
) -> ApiException:
    exc = ApiException(
        status=status,
        reason="Reason",
        body=json.dumps({"errors": errors or [{"code": "x", "detail": "d"}]}),
    )
    exc.headers = urllib3.HTTPHeaderDict({"Content-Type": JSON_API, **(headers or {})})
    return exc


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ErrorKind.PERMANENT),
        (401, ErrorKind.CONFIGURATION),
        (403, ErrorKind.CONFIGURATION),
        (404, ErrorKind.PERMANENT),
        (409, ErrorKind.PERMANENT),
        (413, ErrorKind.PERMANENT),
        (429, ErrorKind.TRANSIENT),
        (500, ErrorKind.TRANSIENT),
        (502, ErrorKind.TRANSIENT),
        (503, ErrorKind.TRANSIENT),
        (504, ErrorKind.TRANSIENT),
        (524, ErrorKind.TRANSIENT),
    ],
)
def test_http_statuses(status: int, kind: ErrorKind) -> None:
    failure = classify(api_exception(status))

    assert failure.kind is kind
    assert failure.status == status
    assert failure.label == str(status)


def test_400_keeps_every_json_api_error_and_its_pointer() -> None:
    pointer = "/data/attributes/events-bulk-create/data/3/attributes/events/data/0/attributes/time"
    failure = classify(
        api_exception(
            400,
            [
                {"code": "invalid", "title": "Invalid input.", "detail": "bad time",
                 "source": {"pointer": pointer}},
                {"code": "invalid", "detail": "bad email", "source": {"pointer": "/data/x"}},
            ],
        )
    )  # fmt: skip

    assert [error.pointer for error in failure.errors] == [pointer, "/data/x"]
    assert failure.errors[0].detail == "bad time"
    assert failure.summary == f"HTTP 400 invalid: bad time (at {pointer}) (+1 more)"


def test_409_keeps_the_conflict_detail() -> None:
    failure = classify(
        api_exception(
            409, [{"code": "duplicate_profile", "meta": {"duplicate_profile_id": "01ABC"}}]
        )
    )

    assert failure.kind is ErrorKind.PERMANENT
    assert failure.errors[0].meta == {"duplicate_profile_id": "01ABC"}


def test_429_carries_retry_after() -> None:
    assert classify(api_exception(429, headers={"Retry-After": "7"})).retry_after == 7.0
    assert classify(api_exception(429, headers={"Retry-After": "soon"})).retry_after is None
    assert classify(api_exception(429)).retry_after is None


def test_a_cloudflare_challenge_403_is_transient() -> None:
    exc = ApiException(status=403, reason="Forbidden", body="<!DOCTYPE html><html></html>")
    exc.headers = urllib3.HTTPHeaderDict(
        {"Content-Type": "text/html; charset=UTF-8", "cf-mitigated": "challenge"}
    )

    failure = classify(exc)

    assert failure.kind is ErrorKind.TRANSIENT
    assert failure.errors == ()


def test_a_body_that_is_not_json_api_still_classifies() -> None:
    exc = ApiException(status=502, reason="Bad Gateway", body="upstream hiccup")

    failure = classify(exc)

    assert failure.kind is ErrorKind.TRANSIENT
    assert failure.summary == "HTTP 502 Bad Gateway"


def test_tls_failures_reported_as_status_0_are_transient() -> None:
    failure = classify(ApiException(status=0, reason="SSLError\nEOF occurred"))

    assert (failure.kind, failure.label) == (ErrorKind.TRANSIENT, "tls")


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (ReadTimeoutError(None, "/api/events", "read timed out"), "timeout"),  # type: ignore[arg-type]
        (MaxRetryError(None, "/api", ConnectTimeoutError("connect timed out")), "timeout"),  # type: ignore[arg-type]
        (MaxRetryError(None, "/api", NewConnectionError(None, "refused")), "connection"),  # type: ignore[arg-type]
        (ProtocolError("Connection aborted.", ConnectionResetError()), "connection"),
        (ConnectionResetError("reset"), "connection"),
    ],
)  # fmt: skip
def test_network_failures_are_transient(exc: BaseException, label: str) -> None:
    failure = classify(exc)

    assert (failure.kind, failure.label, failure.status) == (ErrorKind.TRANSIENT, label, None)


def test_sdk_validation_names_the_bulk_entry_like_klaviyo_would() -> None:
    # Validation happens before any I/O, so nothing needs to listen on this port.
    client = KlaviyoClient("pk_test", test_host="http://127.0.0.1:9")
    event = {
        "type": "event",
        "attributes": {
            "metric": {"data": {"type": "metric", "attributes": {"name": "Order"}}},
            "properties": {},
            "time": "2024-08-01T00:00:00.000Z",
            "value": "9.99",  # the SDK wants a number
        },
    }
    entry = {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": {"type": "profile", "attributes": {"email": "a@x.co"}}},
            "events": {"data": [event]},
        },
    }
    body = {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": [entry, entry]}},
        }
    }

    with pytest.raises(KlaviyoCallError) as raised:
        client.encode_bulk_events(body)

    failure = raised.value.failure
    assert (failure.kind, failure.label) == (ErrorKind.PERMANENT, "invalid_request")
    assert failure.errors[0].pointer.startswith(
        "/data/attributes/events-bulk-create/data/0/attributes/events/data/0/attributes/value"
    )
