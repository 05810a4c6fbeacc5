"""What our bulk requests put on the wire is the JSON the SDK's own methods would send.

For the bulk endpoints the client validates a body once with the SDK's model and writes its dump
itself, as compact UTF-8 (client.py), instead of the SDK's costly model-to-dict round trip and
its `json.dumps`. Here both ways run through the same SDK client, with its connection pool
replaced by a recorder, for every body the conformance cases plan: method, URL and headers must
be identical, the bodies must parse to the same JSON value with the same types (1 and 1.0, true
and 1 differ), and a body the SDK refuses must be refused the same way. The planner's size
estimate must stay above the bytes sent.
"""

from __future__ import annotations

import copy
import gc
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import urllib3
from pydantic import ValidationError

from tests.conformance import SETS, load_cases
from transforms.collector import cyclic_gc_paused
from transforms.klaviyo import client as client_module
from transforms.klaviyo.bulk import (
    Batch,
    EventBatch,
    ProfileBatch,
    estimated_bytes,
    plan_event_batches,
    plan_profile_batches,
)
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


def typed(value: Any) -> Any:
    """A JSON value with the type of every scalar beside it, keys in order: equal only if the
    values are equal and written with the same types."""
    if isinstance(value, dict):
        return ("object", [(key, typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [typed(item) for item in value])
    return (type(value).__name__, value)


def same_request(sdk: Sent | str, ours: Sent | str) -> bool:
    """Both refused, or the same method, URL and headers and a body of the same JSON value."""
    if isinstance(sdk, str) or isinstance(ours, str):
        return sdk == ours
    return ((sdk.method, sdk.url, sdk.headers) == (ours.method, ours.url, ours.headers)
            and typed(json.loads(sdk.body)) == typed(json.loads(ours.body)))


def compact_utf8(sent: Sent | str) -> bool:
    """Our body is written without spaces between tokens and with non-ASCII text as UTF-8."""
    assert not isinstance(sent, str)
    text = sent.body.decode("utf-8")
    return text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(("method", "batch"), [(method, batch) for method, _, batch in REQUESTS],
                         ids=[f"{method}-{name}" for method, name, _ in REQUESTS])
def test_bulk_requests_send_the_sdks_json(method: str, batch: Batch) -> None:
    sdk, ours = sent_both_ways(batch.body(), *WAYS[method])

    assert same_request(sdk, ours)
    if not isinstance(ours, str):
        assert compact_utf8(ours)


def parts_of(batch: Batch) -> list[Mapping[str, Any]]:
    """What the planner measured for a request: create_event attributes with their profile, or
    profile resource objects."""
    if isinstance(batch, EventBatch):
        return [{**event, "profile": profile} for profile, events in batch.entries
                for _, event in events]
    assert isinstance(batch, ProfileBatch)
    return [profile for _, profile in batch.profiles]


@pytest.mark.parametrize(("method", "batch"), [(method, batch) for method, _, batch in REQUESTS],
                         ids=[f"{method}-{name}" for method, name, _ in REQUESTS])
def test_the_size_estimate_is_above_the_bytes_sent(method: str, batch: Batch) -> None:
    client, recorder = recording_client()
    encode, send = WAYS[method][1](client)
    try:
        send(encode(batch.body()))
    except KlaviyoCallError:
        pytest.skip("refused by the SDK's model: never sent")
    (sent,) = recorder.sent
    parts = parts_of(batch)

    assert estimated_bytes(parts) >= len(sent.body)
    assert sum(estimated_bytes([part]) for part in parts) >= len(sent.body)


def with_property(value: Any) -> Mapping[str, Any]:
    """The first packed conformance events request, with `value` as a property of one event."""
    (_, batch), *_ = [(n, b) for method, n, b in REQUESTS
                      if method == CREATE_EVENT and n.endswith("-all")]
    body = copy.deepcopy(batch.body())  # its events are the batch's own dicts
    entry = body["data"]["attributes"]["events-bulk-create"]["data"][0]
    event = entry["attributes"]["events"]["data"][0]["attributes"]
    event["properties"] = {**event.get("properties", {}), "odd": value, "plain": "é 1"}
    return body


@pytest.mark.parametrize("value", ["a\ud800b", 2**70, -(2**64), ["\udfff", 2**100]],
                         ids=["lone-surrogate", "huge-int", "huge-negative-int", "both"])
def test_what_orjson_refuses_is_sent_as_the_sdk_escapes_it(value: Any) -> None:
    sdk, ours = sent_both_ways(with_property(value), *WAYS[CREATE_EVENT])

    assert not isinstance(sdk, str) and not isinstance(ours, str)
    assert same_request(sdk, ours)
    assert b", " not in ours.body and b'": ' not in ours.body  # compact
    assert ours.body.isascii()  # as the SDK writes it: escapes, no lone surrogate in UTF-8


def test_non_ascii_text_is_sent_as_utf8() -> None:
    sdk, ours = sent_both_ways(with_property("ü ✓ 😀"), *WAYS[CREATE_EVENT])

    assert not isinstance(sdk, str) and not isinstance(ours, str)
    assert same_request(sdk, ours)
    assert "ü ✓ 😀".encode() in ours.body and b"\\u00fc" in sdk.body
    assert compact_utf8(ours)


@pytest.mark.parametrize(("before", "after"), [
    (b"+00:00", b"Z"),  # a timestamp's spelling
    (b'"plain":"\xc3\xa9 1"', b'"plain":"\xc3\xa9 2"'),  # a character
])
def test_the_comparison_sees_a_different_value(before: bytes, after: bytes) -> None:
    body = with_property(1)
    client, recorder = recording_client()
    client._events.bulk_create_events_with_http_info(body, _request_timeout=(5.0, 30.0))
    encoded = client.encode_bulk_events(body)
    assert before in encoded.payload
    client.bulk_create_events(Encoded(encoded.payload.replace(before, after, 1)))

    sdk, ours = recorder.sent
    assert ours.headers == sdk.headers
    assert not same_request(sdk, ours)


@pytest.mark.parametrize("changed", [b'"odd":1.0', b'"odd":true', b'"odd":"1"'],
                         ids=["float", "bool", "string"])
def test_the_comparison_sees_a_different_type(changed: bytes) -> None:
    body = with_property(1)
    client, recorder = recording_client()
    client._events.bulk_create_events_with_http_info(body, _request_timeout=(5.0, 30.0))
    encoded = client.encode_bulk_events(body)
    assert b'"odd":1' in encoded.payload
    client.bulk_create_events(Encoded(encoded.payload.replace(b'"odd":1', changed, 1)))

    sdk, ours = recorder.sent
    assert json.loads(sdk.body) == json.loads(ours.body) or changed == b'"odd":"1"'
    assert not same_request(sdk, ours)


def test_the_collector_is_paused_while_a_body_is_encoded(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The encode pauses the cyclic collector (client.py) and leaves it as it found it, also
    when the SDK's model refuses the body: seen from inside the encode, at its last steps (the
    dump it writes, the refusal it classifies). (Counting collections around it instead was
    flaky: a young generation nearly full when an encode ends is collected on the next
    allocation, which is not the encode's.)"""
    body = with_property(1)
    refused = with_property(1)
    refused["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"]["events"][
        "data"][0]["attributes"]["value"] = "9.99"  # must be a number
    seen: list[bool] = []

    def spy(function: Callable[..., Any]) -> Callable[..., Any]:
        def spied(*args: Any, **kwargs: Any) -> Any:
            seen.append(gc.isenabled())
            return function(*args, **kwargs)
        return spied

    monkeypatch.setattr(client_module, "dumps", spy(client_module.dumps))
    monkeypatch.setattr(client_module, "classify", spy(client_module.classify))
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            KlaviyoClient.encode_bulk_events(body)
            with pytest.raises(KlaviyoCallError):
                KlaviyoClient.encode_bulk_events(refused)
            assert gc.isenabled() is enabled
    finally:
        gc.enable()
    assert seen == [False] * 4


def test_no_cyclic_collection_runs_in_a_paused_block() -> None:
    """With collections due on every allocation, none runs inside the block; after it the
    collector is on again."""
    collections: list[int] = []
    inside = False

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and inside:
            collections.append(info["generation"])

    threshold = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(1)
    try:
        with cyclic_gc_paused():
            inside = True
            kept = [{"n": n} for n in range(10_000)]
            inside = False
        assert gc.isenabled()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(count)
    assert collections == [] and len(kept) == 10_000
