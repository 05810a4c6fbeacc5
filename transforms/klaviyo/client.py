"""A thin wrapper over the official SDK (`klaviyo_api.KlaviyoAPI`) for the calls we make.

The SDK is kept for what it is good at: building and checking request bodies against Klaviyo's
schema, and speaking the API revision it was generated for. Its weak spots are covered here:

- No default timeout (calls can hang for ever): every request gets `(connect, read)` timeouts.
- A narrow retry (no 500/502, timeouts or dropped connections; no deadline): it is switched off
  with `max_retries=1` and the `*_with_http_info` variants, which the SDK never wraps in its
  retry anyway. urllib3's default `Retry(3)` under it (connection errors, and every error of a
  GET, retried unseen) is replaced by `Retry(0)`: one request per attempt, so the sender is the
  only retry layer and every attempt is counted.
- Response models that fail validation after a successful write: responses come back as plain
  dicts (`USE_DICTIONARY_FOR_RESPONSE_DATA`).
- Response handling that takes any 2xx for the API's answer (a proxy's page taken for an
  accepted bulk request) or crashes on it (AttributeError): `_klaviyos` checks each 2xx before
  the SDK reads it, `_answering` that it holds what the sender reads (a job's id and status),
  and one that is not Klaviyo's is a transient `unexpected_response`.
- Exceptions whose text includes response headers, and an SDK object whose repr prints the API
  key: every failure is re-raised as a classified `KlaviyoCallError` with the key scrubbed, and
  this class's repr shows only the host.
- A costly way from body to bytes: a bulk method validates its dict into models, and the
  ApiClient turns them back into a dict through each nested model's `to_dict` and a recursive
  sanitizer, about 0.2 s of CPU for 1,000 events (more than Klaviyo's whole request budget at
  2.5 requests/s on one core). For the bulk endpoints the body is instead validated once by the
  SDK's own model (`encode_*`: pydantic-core, a few ms) and its dump is written as the same
  JSON the SDK would send (the model's dump by alias without unset values, dates as
  `isoformat()`), as compact UTF-8 by orjson instead of the SDK's `json.dumps` (ASCII escapes
  and spaces): the same JSON value, fewer bytes, a sixth of the CPU. What orjson refuses (lone
  surrogates, integers beyond 64 bits, non-string keys) is written by `json.dumps` as the SDK
  would escape it, without the spaces. tests/test_klaviyo_wire.py proves, for every conformance
  body, that the body parses to the same JSON value (types included) as the SDK's. The one
  difference is a non-finite float, which is not JSON: the SDK would write `NaN`, orjson writes
  `null`; the planner never produces one (mapping drops NaN, infinite numbers become null as in
  JavaScript). The request itself still goes through the SDK: its serializer for the endpoint
  (path, Accept and Content-Type), its ApiClient (base URL, `Authorization`, the `revision`
  header), its REST client and its response handling; only the body arrives encoded
  (`Encoded`). The encoded bytes are reused by every retry of the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3
from klaviyo_api import KlaviyoAPI
from openapi_client.api_arg_options import USE_DICTIONARY_FOR_RESPONSE_DATA
from openapi_client.exceptions import ApiException
from openapi_client.models.events_bulk_create_job import EventsBulkCreateJob
from openapi_client.models.profile_import_job_create_query import ProfileImportJobCreateQuery
from openapi_client.rest import RESTClientObject, RESTResponse
from pydantic import BaseModel, ValidationError
from urllib3.util import Retry

from transforms.collector import cyclic_gc_paused
from transforms.klaviyo.errors import (
    CALL_EXCEPTIONS,
    CallFailure,
    KlaviyoCallError,
    NotKlaviyosAnswer,
    classify,
)
from transforms.klaviyo.wire import dumps

IMPORT_ERRORS_PAGE_SIZE = 100  # the API's maximum


# Response types as the generated `*_with_http_info` methods declare them, with dicts for 2xx.
_ERROR_TYPES = {"4XX": "GetAccounts4XXResponse", "5XX": "GetAccounts4XXResponse"}
_NO_BODY = {"202": None, **_ERROR_TYPES}
_DICT_BODY = {"202": "Dict[str, object]", **_ERROR_TYPES}
# What a generated `_<method>_serialize` is given to leave the SDK's defaults alone.
_DEFAULTS = {"_request_auth": None, "_content_type": None, "_headers": None, "_host_index": 0}


@dataclass(frozen=True)
class Response:
    status: int
    data: dict[str, Any]


@dataclass(frozen=True)
class Encoded:
    """A request body the SDK's model has validated, as compact UTF-8 JSON bytes: the same JSON
    value the SDK would send for it."""

    payload: bytes


def encode(model: type[BaseModel], body: Mapping[str, Any]) -> Encoded:
    """Validate `body` with the SDK's model once and write the JSON the SDK's ApiClient would:
    `json.dumps(sanitize_for_serialization(model))` is the model's dump by alias without None
    (to_dict), with dates as isoformat (sanitize_for_serialization). Written by `wire.dumps`
    (compact UTF-8). Raises `KlaviyoCallError` with the classified validation failure, as the
    SDK's own method would raise it."""
    with cyclic_gc_paused():  # the model and dump hold no cycles (collector.py)
        try:
            validated = model.model_validate(body)
        except ValidationError as exc:
            raise KlaviyoCallError(classify(exc)) from None
        return Encoded(dumps(validated.model_dump(by_alias=True, exclude_none=True)))


class _RESTClient(RESTClientObject):
    """The SDK's REST client, which also sends a body that arrives `Encoded`.

    The SDK's own `request` would `json.dumps` any JSON body; an encoded one goes out as its
    bytes, with the same pool, headers, timeouts and response type.
    """

    def request(self, method: str, url: str, headers: Any = None, body: Any = None,
                post_params: Any = None, _request_timeout: Any = None) -> RESTResponse:
        if not isinstance(body, Encoded):
            return super().request(method, url, headers, body, post_params, _request_timeout)
        connect, read = _request_timeout
        try:
            response = self.pool_manager.request(
                method, url, body=body.payload, headers=headers, preload_content=False,
                timeout=urllib3.Timeout(connect=connect, read=read))
        except urllib3.exceptions.SSLError as error:  # as the SDK reports it
            raise ApiException(status=0, reason=f"{type(error).__name__}\n{error}") from None
        return RESTResponse(response)


_CHARSET = re.compile(r"charset=([a-zA-Z\-\d]+)[\s;]?")  # the SDK's (response_deserialize)


def _klaviyos(deserialize: Callable[..., Any], response_data: RESTResponse,
              response_types_map: Mapping[str, str | None] | None = None,
              exclude_none: bool = False) -> Any:
    """The ApiClient's `response_deserialize`, for a 2xx only once it is the Klaviyo API's
    answer: the SDK takes whatever it reads for a success (an empty dict where a bulk events
    request expects no body: events lost) or fails on it with an AttributeError or a
    UnicodeDecodeError (a body that is not a JSON object where the endpoint answers one).

    A 2xx the SDK reads (its status has a response type: profile import 200/201, bulk import
    202, the GETs' 200) must carry a JSON object; one it does not read (bulk events' 202, any
    204) may be empty, and anything else in it must be a JSON object too. JSON is what a
    Content-Type naming json says (`application/vnd.api+json; charset=utf-8`, any case), read
    as the SDK reads it (its charset, `json.loads`). Error statuses are the SDK's business (a
    Cloudflare challenge is an HTML 403: errors.py)."""
    status = response_data.status
    if 200 <= status <= 299:
        types = response_types_map or {}
        read = types.get(str(status)) or types.get(f"{str(status)[0]}XX")
        _check_answer(response_data, expects_object=read is not None)
    return deserialize(response_data, response_types_map, exclude_none)


def _check_answer(answer: RESTResponse, *, expects_object: bool) -> None:
    body = answer.data or b""
    if not body.strip():
        if expects_object:
            raise NotKlaviyosAnswer(answer.status, "with an empty body")
        return
    content_type = answer.getheader("Content-Type") or ""
    if "json" not in content_type.lower():
        raise NotKlaviyosAnswer(answer.status, content_type or "without a content type")
    match = _CHARSET.search(content_type)
    try:
        document = json.loads(body.decode(match.group(1) if match else "utf-8"))
    except (ValueError, LookupError):  # UnicodeDecodeError is a ValueError
        raise NotKlaviyosAnswer(answer.status, f"{content_type} that is not JSON") from None
    if not isinstance(document, dict):
        raise NotKlaviyosAnswer(answer.status, f"JSON {type(document).__name__}")


class KlaviyoClient:
    """One SDK client (one connection pool), safe to share between threads.

    `test_host` replaces `https://a.klaviyo.com` (scheme, host and port, no `/api`), for the
    local test server or a proxy.
    """

    def __init__(
        self,
        api_key: str,
        *,
        test_host: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        if not api_key:
            raise ValueError("a Klaviyo private API key is required")
        self._api_key = api_key
        self._sdk = KlaviyoAPI(
            api_key,
            max_retries=1,
            test_host=test_host,
            options={USE_DICTIONARY_FOR_RESPONSE_DATA: True},
        )
        # The pool is built in the constructor: rebuild it without urllib3's retries (spec §1.3:
        # also no Retry-After handling of its own that could swallow a 429).
        self._sdk.configuration.retries = Retry(total=0, respect_retry_after_header=False)
        self._sdk.api_client.rest_client = _RESTClient(self._sdk.configuration)
        api_client = self._sdk.api_client  # the one every API object below calls
        api_client.response_deserialize = partial(
            _klaviyos, api_client.response_deserialize)
        # Each SDK property access builds a new API object; build them once.
        self._events = self._sdk.Events
        self._profiles = self._sdk.Profiles
        self._timeout = (float(connect_timeout), float(read_timeout))

    def __repr__(self) -> str:
        return f"KlaviyoClient(host={self._sdk.configuration.host!r}, timeout={self._timeout})"

    @staticmethod
    def encode_bulk_events(body: Mapping[str, Any]) -> Encoded:
        """A bulk events body, validated and encoded for `bulk_create_events`."""
        return encode(EventsBulkCreateJob, body)

    def bulk_create_events(self, body: Encoded) -> Response:
        """POST /api/event-bulk-create-jobs (202, no body)."""
        serialize = partial(self._events._bulk_create_events_serialize, None, **_DEFAULTS)
        return self._send(serialize, body, _NO_BODY)

    def create_or_update_profile(self, body: Mapping[str, Any]) -> Response:
        """POST /api/profile-import: 201 created or 200 updated, with the profile."""
        return _answering(self._call(self._profiles.create_or_update_profile_with_http_info,
                                     body), "the profile's data.id", _has_id)

    @staticmethod
    def encode_bulk_import(body: Mapping[str, Any]) -> Encoded:
        """A bulk profile import body, validated and encoded for `bulk_import_profiles`."""
        return encode(ProfileImportJobCreateQuery, body)

    def bulk_import_profiles(self, body: Encoded) -> Response:
        """POST /api/profile-bulk-import-jobs: 202 with the queued job (`data.id`)."""
        serialize = partial(self._profiles._bulk_import_profiles_serialize, None, None,
                            **_DEFAULTS)  # no body, no sparse fieldset
        return _answering(self._send(serialize, body, _DICT_BODY), "the job's data.id", _has_id)

    def get_bulk_import_job(self, job_id: str) -> Response:
        """GET /api/profile-bulk-import-jobs/{id}: the job and its `status`."""
        return _answering(
            self._call(self._profiles.get_bulk_import_profiles_job_with_http_info, job_id),
            "the job's data.attributes.status",
            lambda data: isinstance(_member(data, "data", "attributes", "status"), str))

    def check_key(self) -> Response:
        """GET /api/profiles with one profile: the cheapest authenticated read (a key check)."""
        return _answering(self._call(self._profiles.get_profiles_with_http_info, page_size=1),
                          "a data list", _has_list)

    def get_import_errors(self, job_id: str, page_cursor: str | None = None) -> Response:
        """One page of GET /api/profile-bulk-import-jobs/{id}/import-errors.

        `next_page_cursor(response)` gives the cursor of the next page.
        """
        return _answering(self._call(
            self._profiles.get_errors_for_bulk_import_profiles_job_with_http_info,
            job_id,
            page_cursor=page_cursor,
            page_size=IMPORT_ERRORS_PAGE_SIZE,
        ), "a data list", _has_list)

    def _send(self, serialize: Callable[[], Any], body: Encoded,
              response_types: Mapping[str, str | None]) -> Response:
        """What the SDK's `*_with_http_info` method does after validating its body: the
        endpoint's serializer (given no body, so nothing is sanitized), the ApiClient's call and
        its response handling (a non-2xx raises `ApiException`)."""

        def send() -> Any:
            method, url, headers, _, post_params = serialize()
            api_client = self._sdk.api_client
            answer = api_client.call_api(method, url, headers, body, post_params,
                                         _request_timeout=self._timeout)
            answer.read()
            return api_client.response_deserialize(answer, dict(response_types))

        return self._guarded(send)

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Response:
        """An SDK `*_with_http_info` method, with our timeouts."""
        return self._guarded(partial(method, *args, _request_timeout=self._timeout, **kwargs))

    def _guarded(self, request: Callable[[], Any]) -> Response:
        """The response of `request`, or its failure as a key-free `KlaviyoCallError`."""
        try:
            result = request()
        except CALL_EXCEPTIONS as exc:
            failure = classify(exc)
            # `from None`: the SDK exception (headers and all) must not ride along in tracebacks.
            raise KlaviyoCallError(without_key(failure, self._api_key)) from None
        return Response(result.status_code, result.data or {})  # a dict: _klaviyos


def _answering(response: Response, what: str, valid: Callable[[dict[str, Any]], bool]
               ) -> Response:
    """`response` if it holds what the endpoint answers and the sender reads; else it is a
    JSON object of someone else's (a proxy's `{"status": "ok"}`), a transient
    `unexpected_response` like a page (`_klaviyos`): taken, it crashed the flush (KeyError) or
    passed for a stored profile or an import without errors."""
    if not valid(response.data):
        raise KlaviyoCallError(classify(NotKlaviyosAnswer(response.status, f"without {what}")))
    return response


def _member(data: Any, *path: str) -> Any:
    for name in path:
        data = data.get(name) if isinstance(data, dict) else None
    return data


def _has_id(data: dict[str, Any]) -> bool:
    found = _member(data, "data", "id")
    return isinstance(found, str) and bool(found)


def _has_list(data: dict[str, Any]) -> bool:
    return isinstance(data.get("data"), list)


_SHOWN_PREFIX = 3  # "pk_": what every private key starts with; one more character is secret


def without_key(failure: CallFailure, key: str) -> CallFailure:
    """`failure` with `key` as *** wherever an answer could have echoed it (a proxy that
    repeats the request's Authorization header): the summary, which is also cleared of a start
    of the key left where it was clipped, and every part of its JSON:API errors, which become
    dead-letter reasons."""
    summary = failure.summary.replace(key, "***")
    if summary.endswith("…"):
        clipped = summary[:-1]
        for length in range(min(len(key), len(clipped)), _SHOWN_PREFIX, -1):
            if clipped.endswith(key[:length]):
                summary = f"{clipped[:-length]}***…"
                break
    errors = tuple(replace(error, code=error.code.replace(key, "***"),
                           title=error.title.replace(key, "***"),
                           detail=error.detail.replace(key, "***"),
                           pointer=error.pointer.replace(key, "***"),
                           meta=_value_without_key(error.meta, key))
                   for error in failure.errors)
    return replace(failure, summary=summary, errors=errors)


def _value_without_key(value: Any, key: str) -> Any:
    if isinstance(value, str):
        return value.replace(key, "***")
    if isinstance(value, dict):
        return {_value_without_key(name, key): _value_without_key(item, key)
                for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_value_without_key(item, key) for item in value]
    return value


def next_page_cursor(page: Response) -> str | None:
    """The `page[cursor]` of a page's `links.next` URL, as the SDK wants it; None at the end."""
    next_url = (page.data.get("links") or {}).get("next")
    if not next_url:
        return None
    cursors = parse_qs(urlsplit(next_url).query).get("page[cursor]")
    return cursors[0] if cursors else None
