"""The local Klaviyo test server answers like Klaviyo, as the official SDK sees it."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from klaviyo_api import KlaviyoAPI
from openapi_client.exceptions import ApiException

from tests.klaviyo_server import BULK_EVENTS, EVENTS, Fault, KlaviyoTestServer

pytest_plugins = ["tests.conftest_klaviyo"]


def sdk(server: KlaviyoTestServer, api_key: str | None = None) -> Any:
    return KlaviyoAPI(api_key or server.api_key, max_retries=1, test_host=server.url)


def refusal(request: Callable[[], object]) -> tuple[int, Any, list[dict[str, Any]]]:
    """Status, headers and JSON:API errors of a request the server refuses."""
    with pytest.raises(ApiException) as raised:
        request()
    body = raised.value.body or ""
    errors = json.loads(body)["errors"] if body.startswith("{") else []
    return raised.value.status, raised.value.headers or {}, errors


def create_event(unique_id: str | None, time: str = "2024-08-01T00:00:00Z") -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "profile": {"data": {"type": "profile", "attributes": {"email": "ann@example.com"}}},
        "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed"}}},
        "properties": {},
        "time": time,
    }
    if unique_id is not None:
        attributes["unique_id"] = unique_id
    return {"data": {"type": "event", "attributes": attributes}}


def test_single_events_are_kept_once_per_unique_id_or_second(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    events = sdk(klaviyo_server).Events
    for body in [
        create_event("a"),
        create_event("a"),  # repeat: ignored
        create_event(None),
        create_event(None, time="2024-08-01T00:00:00.500Z"),  # same second: ignored
        create_event(None, time="2024-08-01T00:00:01Z"),
    ]:
        events.create_event(body)

    assert klaviyo_server.statuses(EVENTS) == [202] * 5
    assert klaviyo_server.stored_unique_ids() == ["a", None, None]
    assert klaviyo_server.events_received == 5


def test_a_bad_single_event_gets_a_json_api_error(klaviyo_server: KlaviyoTestServer) -> None:
    bad = create_event("a", time="1999-01-01T00:00:00Z")

    status, _, (error,) = refusal(partial(sdk(klaviyo_server).Events.create_event, bad))

    assert status == 400
    assert error["source"]["pointer"] == "/data/attributes/time"


def test_rate_limits_answer_429_with_an_integer_retry_after(
    klaviyo_server: KlaviyoTestServer,
) -> None:
    klaviyo_server.time_scale = 1 / 3600  # a "second" lasts an hour: no window ends mid-test
    klaviyo_server.rate_limits[EVENTS] = (2, 100)
    events = sdk(klaviyo_server).Events

    events.create_event(create_event("a"))
    events.create_event(create_event("b"))
    status, headers, (error,) = refusal(partial(events.create_event, create_event("c")))

    assert status == 429
    assert headers["Retry-After"].isdigit()
    assert int(headers["Retry-After"]) >= 1
    assert error["code"] == "throttled"
    assert klaviyo_server.stored_unique_ids() == ["a", "b"]


def test_auth_failures_look_like_klaviyos(klaviyo_server: KlaviyoTestServer) -> None:
    klaviyo_server.inject(BULK_EVENTS, Fault.forbidden(), Fault.challenge())
    body = {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": []}},
        }
    }
    clients = [sdk(klaviyo_server, "pk_wrong"), sdk(klaviyo_server), sdk(klaviyo_server)]

    answers = [refusal(partial(client.Events.bulk_create_events, body)) for client in clients]

    wrong_key, forbidden, challenge = answers
    assert (wrong_key[0], wrong_key[2][0]["code"]) == (401, "not_authenticated")
    assert (forbidden[0], forbidden[2][0]["code"]) == (403, "permission_denied")
    assert challenge[0] == 403
    assert challenge[1]["Content-Type"].startswith("text/html")
    assert challenge[1]["cf-mitigated"] == "challenge"


def test_answers_are_schema_valid_for_the_typed_sdk(klaviyo_server: KlaviyoTestServer) -> None:
    """Without USE_DICTIONARY_FOR_RESPONSE_DATA the SDK checks every answer against its models."""
    profiles = sdk(klaviyo_server).Profiles
    profile = {"type": "profile", "attributes": {"email": "ann@example.com"}}
    job_body = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {
                "profiles": {"data": [{"type": "profile", "attributes": {"email": "x"}}]}
            },
        }
    }

    created = profiles.create_or_update_profile({"data": profile})
    job = profiles.bulk_import_profiles(job_body)
    statuses = [profiles.get_bulk_import_profiles_job(job.data.id).data.attributes.status]
    statuses.append(profiles.get_bulk_import_profiles_job(job.data.id).data.attributes.status)
    errors = profiles.get_errors_for_bulk_import_profiles_job(job.data.id)

    assert created.data.id
    assert job.data.attributes.status == "queued"
    assert statuses == ["processing", "complete"]
    assert errors.data[0].attributes.original_payload == {"email": "x"}


@pytest.mark.parametrize("raw", [b'{"a": 1, "b": [1.5, "x"]}', b'{"a": NaN}', b'{"a": 1e999}',
                                 b'{"a": "\\ud800"}', b'{"a": 123456789012345678901234567890}',
                                 b'{"a": -9223372036854775809}', b'{"a": 18446744073709551616}',
                                 b'{"a": 1, "a": 2}', b"[1, 2]"])
def test_bodies_are_read_as_the_standard_library_reads_them(raw: bytes) -> None:
    """The server reads with orjson first (speed) and falls back to the standard library, so a
    body orjson refuses still gets the answer it got before."""
    from tests.klaviyo_server import _parse

    assert repr(_parse(raw)) == repr(json.loads(raw))


def test_unreadable_bodies_stay_unreadable() -> None:
    from tests.klaviyo_server import _UNREADABLE, _parse

    assert _parse(b"{not json") is _UNREADABLE
    assert _parse(b"") is _UNREADABLE
