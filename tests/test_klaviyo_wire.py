"""The bytes our bulk requests put on the wire are the ones the SDK's own methods would send.

For the bulk endpoints the client validates a body once with the SDK's model and encodes it
itself (client.py), instead of the SDK's costly model-to-dict round trip. Here both ways run
through the same SDK client, with its connection pool replaced by a recorder, for every body the
conformance cases plan: method, URL, headers and body bytes must be identical, and a body the
SDK refuses must be refused the same way.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import urllib3
from pydantic import ValidationError

from tests.conformance import SETS, load_cases
from transforms.klaviyo.bulk import Batch, plan_event_batches, plan_profile_batches
from transforms.klaviyo.client import Encoded, KlaviyoClient
from transforms.klaviyo.errors import KlaviyoCallError
from transforms.klaviyo.wire import CREATE_EVENT, CREATE_OR_UPDATE_PROFILE

JOB = (b'{"data": {"type": "profile-bulk-import-job", "id": "job-1", "attributes": '
       b'{"status": "queued"}, "links": {"self": "https://a.klaviyo.com/x/"}}}')


@dataclass(frozen=True)
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class Recorder:
    """Stands in for urllib3's PoolManager: keeps each request, answers 202."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def request(self, method: str, url: str, *, body: str | bytes | None = None,
                headers: Mapping[str, str], **_: Any) -> urllib3.HTTPResponse:
        raw = body.encode() if isinstance(body, str) else body or b""
        self.sent.append(Sent(method, url, dict(headers), raw))
        answer = JOB if "profile-bulk-import-jobs" in url else b""
        return urllib3.HTTPResponse(body=io.BytesIO(answer), status=202, preload_content=False,
                                    headers={"Content-Type": "application/vnd.api+json"})


def recording_client() -> tuple[KlaviyoClient, Recorder]:
    client = KlaviyoClient("pk_wire_0123456789abcdef", test_host="https://a.klaviyo.test")
    recorder = Recorder()
    client._sdk.api_client.rest_client.pool_manager = recorder
    return client, recorder


def planned(method: str) -> Iterator[tuple[str, list[Mapping[str, Any]]]]:
    """Per conformance set, the bodies of every planned call of `method`."""
    for name in SETS:
        bodies = [body for _, expected in load_cases(name) for event in expected["events"]
                  for call_method, body in event.get("calls", []) if call_method == method]
        yield name, bodies


def requests_of(method: str) -> list[tuple[str, Batch]]:
    """Bulk requests of every set: one per planned call, and the set's calls packed together."""
    found: list[tuple[str, Batch]] = []
    for name, bodies in planned(method):
        if method == CREATE_EVENT:
            alone = [batch for body in bodies for batch in plan_event_batches([body]).batches]
            found += [(f"{name}-{i}", batch) for i, batch in enumerate(alone)]
            found += [(f"{name}-all", batch) for batch in plan_event_batches(bodies).batches]
        else:
            profiles = [batch for body in bodies for batch in plan_profile_batches([body])]
            found += [(f"{name}-{i}", batch) for i, batch in enumerate(profiles)]
            found += [(f"{name}-all", batch) for batch in plan_profile_batches(bodies)]
    return found


def sent_both_ways(body: Mapping[str, Any], sdk_method: Callable[[KlaviyoClient], Any],
                   ours: Callable[[KlaviyoClient], tuple[Callable[[Mapping[str, Any]], Encoded],
                                                        Callable[[Encoded], Any]]]
                   ) -> tuple[Sent | str, Sent | str]:
    """What the SDK's own method and our encode-then-send put on the wire ("refused" if the
    SDK's model refused the body)."""
    results: list[Sent | str] = []
    for use_sdk in (True, False):
        client, recorder = recording_client()
        try:
            if use_sdk:
                sdk_method(client)(body, _request_timeout=(5.0, 30.0))
            else:
                encode, send = ours(client)
                send(encode(body))
        except (ValidationError, KlaviyoCallError):
            results.append("refused")
            continue
        (sent,) = recorder.sent
        results.append(sent)
    return results[0], results[1]


WAYS: dict[str, tuple[Callable[[KlaviyoClient], Any], Callable[[KlaviyoClient], Any]]] = {
    CREATE_EVENT: (lambda client: client._events.bulk_create_events_with_http_info,
                   lambda client: (client.encode_bulk_events, client.bulk_create_events)),
    CREATE_OR_UPDATE_PROFILE: (
        lambda client: client._profiles.bulk_import_profiles_with_http_info,
        lambda client: (client.encode_bulk_import, client.bulk_import_profiles)),
}
REQUESTS = [(method, name, batch) for method in WAYS for name, batch in requests_of(method)]


def test_the_cases_cover_both_bulk_endpoints() -> None:
    counts = Counter(method for method, _, _ in REQUESTS)
    assert counts[CREATE_EVENT] > 500
    assert counts[CREATE_OR_UPDATE_PROFILE] > 100


@pytest.mark.parametrize(("method", "batch"), [(method, batch) for method, _, batch in REQUESTS],
                         ids=[f"{method}-{name}" for method, name, _ in REQUESTS])
def test_bulk_request_bytes_are_the_sdks(method: str, batch: Batch) -> None:
    sdk, ours = sent_both_ways(batch.body(), *WAYS[method])

    assert ours == sdk


def test_the_comparison_sees_a_difference() -> None:
    """The check can fail: a body that differs in one timestamp's spelling is caught."""
    (name, batch), *_ = [(n, b) for method, n, b in REQUESTS
                         if method == CREATE_EVENT and n.endswith("-all")]
    body = batch.body()
    client, recorder = recording_client()
    client._events.bulk_create_events_with_http_info(body, _request_timeout=(5.0, 30.0))
    encoded = client.encode_bulk_events(body)
    changed = Encoded(encoded.payload.replace(b"+00:00", b"Z", 1))
    client.bulk_create_events(changed)

    sdk, ours = recorder.sent
    assert b"+00:00" in sdk.body, name
    assert ours.headers == sdk.headers and ours.body != sdk.body
