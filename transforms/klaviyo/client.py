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
- Exceptions whose text includes response headers, and an SDK object whose repr prints the API
  key: every failure is re-raised as a classified `KlaviyoCallError` with the key scrubbed, and
  this class's repr shows only the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from klaviyo_api import KlaviyoAPI
from openapi_client.api_arg_options import USE_DICTIONARY_FOR_RESPONSE_DATA
from openapi_client.rest import RESTClientObject
from urllib3.util import Retry

from transforms.klaviyo.errors import CALL_EXCEPTIONS, KlaviyoCallError, classify

IMPORT_ERRORS_PAGE_SIZE = 100  # the API's maximum


@dataclass(frozen=True)
class Response:
    status: int
    data: dict[str, Any]


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
        self._sdk.api_client.rest_client = RESTClientObject(self._sdk.configuration)
        # Each SDK property access builds a new API object; build them once.
        self._events = self._sdk.Events
        self._profiles = self._sdk.Profiles
        self._timeout = (float(connect_timeout), float(read_timeout))

    def __repr__(self) -> str:
        return f"KlaviyoClient(host={self._sdk.configuration.host!r}, timeout={self._timeout})"

    def bulk_create_events(self, body: Mapping[str, Any]) -> Response:
        """POST /api/event-bulk-create-jobs (202, no body)."""
        return self._call(self._events.bulk_create_events_with_http_info, body)

    def create_or_update_profile(self, body: Mapping[str, Any]) -> Response:
        """POST /api/profile-import: 201 created or 200 updated, with the profile."""
        return self._call(self._profiles.create_or_update_profile_with_http_info, body)

    def bulk_import_profiles(self, body: Mapping[str, Any]) -> Response:
        """POST /api/profile-bulk-import-jobs: 202 with the queued job (`data.id`)."""
        return self._call(self._profiles.bulk_import_profiles_with_http_info, body)

    def get_bulk_import_job(self, job_id: str) -> Response:
        """GET /api/profile-bulk-import-jobs/{id}: the job and its `status`."""
        return self._call(self._profiles.get_bulk_import_profiles_job_with_http_info, job_id)

    def check_key(self) -> Response:
        """GET /api/profiles with one profile: the cheapest authenticated read (a key check)."""
        return self._call(self._profiles.get_profiles_with_http_info, page_size=1)

    def get_import_errors(self, job_id: str, page_cursor: str | None = None) -> Response:
        """One page of GET /api/profile-bulk-import-jobs/{id}/import-errors.

        `next_page_cursor(response)` gives the cursor of the next page.
        """
        return self._call(
            self._profiles.get_errors_for_bulk_import_profiles_job_with_http_info,
            job_id,
            page_cursor=page_cursor,
            page_size=IMPORT_ERRORS_PAGE_SIZE,
        )

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Response:
        try:
            result = method(*args, _request_timeout=self._timeout, **kwargs)
        except CALL_EXCEPTIONS as exc:
            failure = classify(exc)
            scrubbed = replace(failure, summary=failure.summary.replace(self._api_key, "***"))
            # `from None`: the SDK exception (headers and all) must not ride along in tracebacks.
            raise KlaviyoCallError(scrubbed) from None
        return Response(result.status_code, result.data or {})


def next_page_cursor(page: Response) -> str | None:
    """The `page[cursor]` of a page's `links.next` URL, as the SDK wants it; None at the end."""
    next_url = (page.data.get("links") or {}).get("next")
    if not next_url:
        return None
    cursors = parse_qs(urlsplit(next_url).query).get("page[cursor]")
    return cursors[0] if cursors else None
