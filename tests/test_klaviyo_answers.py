"""What the client makes of a 2xx answer, byte for byte: the answers Klaviyo really gives are
taken (an empty 202, a 204, `application/vnd.api+json; charset=utf-8`, header names in any
case, a gzip body), and a 2xx that is not Klaviyo's answer (a proxy's page, whatever its
Content-Type says) is a transient `unexpected_response`, never an accepted request nor an
exception the sender does not know (the SDK's AttributeError on a body it cannot read as an
object). The key is in none of the failures."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from transforms.klaviyo.api_key import ApiKeySource, check_api_key
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.errors import ErrorKind, KlaviyoCallError

API_KEY = "pk_answers_0123456789abcdef"
JSON_API = "application/vnd.api+json; charset=utf-8"
PROFILE = b'{"data": {"type": "profile", "id": "01P", "attributes": {"email": "a@b.co"}}}'
JOB = (b'{"data": {"type": "profile-bulk-import-job", "id": "job-1", "attributes": '
       b'{"status": "processing"}}}')
PAGE = b'{"data": [], "links": {}}'


class Answers:
    """The raw answer (status, headers, body) each path gets next; the default is Klaviyo's."""

    def __init__(self) -> None:
        self.next: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.asked: list[str] = []


def _handler(answers: Answers) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            path = self.path.split("?")[0].rstrip("/")
            answers.asked.append(path)
            status, headers, body = answers.next.pop(path, None) or _KLAVIYOS[path]
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _serve

    return Handler


_KLAVIYOS: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {
    "/api/event-bulk-create-jobs": (202, [], b""),
    "/api/profile-import": (201, [("Content-Type", JSON_API)], PROFILE),
    "/api/profile-bulk-import-jobs": (202, [("Content-Type", JSON_API)], JOB),
    "/api/profiles": (200, [("Content-Type", JSON_API)], PAGE),
    "/api/profile-bulk-import-jobs/job-1": (200, [("Content-Type", JSON_API)], JOB),
    "/api/profile-bulk-import-jobs/job-1/import-errors": (200, [("Content-Type", JSON_API)], PAGE),
}


@pytest.fixture
def server() -> Iterator[tuple[str, Answers]]:
    answers = Answers()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(answers))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answers
    finally:
        httpd.shutdown()
        httpd.server_close()


EVENTS = {"data": {"type": "event-bulk-create-job", "attributes": {"events-bulk-create": {
    "data": [{"type": "event-bulk-create", "attributes": {
        "profile": {"data": {"type": "profile", "attributes": {"email": "a@b.co"}}},
        "events": {"data": [{"type": "event", "attributes": {
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed"}}},
            "properties": {}, "time": "2026-11-28T10:00:00+00:00", "unique_id": "e-1"}}]}}}]}}}}
IMPORT = {"data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": [
    {"type": "profile", "attributes": {"email": "a@b.co"}}]}}}}
UPSERT = {"data": {"type": "profile", "attributes": {"email": "a@b.co"}}}


def calls(client: KlaviyoClient) -> dict[str, Any]:
    """Each call the client makes, by the path it asks."""
    return {
        "/api/event-bulk-create-jobs":
            lambda: client.bulk_create_events(client.encode_bulk_events(EVENTS)),
        "/api/profile-import": lambda: client.create_or_update_profile(UPSERT),
        "/api/profile-bulk-import-jobs":
            lambda: client.bulk_import_profiles(client.encode_bulk_import(IMPORT)),
        "/api/profile-bulk-import-jobs/job-1": lambda: client.get_bulk_import_job("job-1"),
        "/api/profile-bulk-import-jobs/job-1/import-errors":
            lambda: client.get_import_errors("job-1"),
        "/api/profiles": client.check_key,
    }


GENUINE = [
    ("/api/event-bulk-create-jobs", 202, [], b""),
    ("/api/event-bulk-create-jobs", 202, [("Content-Type", "text/html; charset=utf-8")], b""),
    ("/api/event-bulk-create-jobs", 202, [("Content-Type", JSON_API)], b""),
    ("/api/event-bulk-create-jobs", 204, [], b""),
    ("/api/profile-import", 200, [("Content-Type", JSON_API)], PROFILE),
    ("/api/profile-import", 201, [("CONTENT-TYPE", "Application/VND.API+JSON")], PROFILE),
    ("/api/profile-import", 201, [("content-type", "application/json")], PROFILE),
    ("/api/profile-import", 200, [("Content-Type", JSON_API), ("Content-Encoding", "gzip")],
     gzip.compress(PROFILE)),
    ("/api/profile-bulk-import-jobs", 202, [("Content-Type", JSON_API)], JOB),
    ("/api/profile-bulk-import-jobs/job-1", 200, [("Content-Type", JSON_API)], JOB),
    ("/api/profiles", 200, [("Content-Type", JSON_API)], b'{"data": []}'),
]


@pytest.mark.parametrize(("path", "status", "headers", "body"), GENUINE)
def test_klaviyos_own_answers_are_taken(server: tuple[str, Answers], path: str, status: int,
                                        headers: list[tuple[str, str]], body: bytes) -> None:
    url, answers = server
    answers.next[path] = (status, headers, body)
    client = KlaviyoClient(API_KEY, test_host=url)

    response = calls(client)[path]()

    assert response.status == status
    assert response.data == ({} if not body else response.data)
    if path == "/api/profile-import":
        assert response.data["data"]["id"] == "01P"


NOT_KLAVIYOS = [
    ("html as html", [("Content-Type", "text/html")], b"<html>proxy</html>"),
    ("html as json", [("Content-Type", "application/json")], b"<html>proxy</html>"),
    ("cut json", [("Content-Type", JSON_API)], b'{"data": {"type": "prof'),
    ("a list", [("Content-Type", JSON_API)], b"[]"),
    ("a string", [("Content-Type", JSON_API)], b'"ok"'),
    ("a number", [("Content-Type", JSON_API)], b"1"),
    ("not utf-8", [("Content-Type", JSON_API)], b'{"a": "\xff"}'),
    ("no content type", [], b'{"data": {}}'),
]


@pytest.mark.parametrize("path", list(_KLAVIYOS))
@pytest.mark.parametrize(("what", "headers", "body"), NOT_KLAVIYOS,
                         ids=[what for what, _, _ in NOT_KLAVIYOS])
def test_a_2xx_that_is_not_klaviyos_answer_is_a_transient_unexpected_response(
        server: tuple[str, Answers], path: str, what: str, headers: list[tuple[str, str]],
        body: bytes) -> None:
    url, answers = server
    answers.next[path] = (202 if "jobs" in path and "/job-1" not in path else 200, headers,
                          body)
    client = KlaviyoClient(API_KEY, test_host=url)

    with pytest.raises(KlaviyoCallError) as raised:
        calls(client)[path]()

    failure = raised.value.failure
    assert (failure.kind, failure.label) == (ErrorKind.TRANSIENT, "unexpected_response")
    assert "not an answer of the Klaviyo API" in failure.summary
    assert API_KEY not in repr(failure) and raised.value.__cause__ is None


@pytest.mark.parametrize("path", [path for path in _KLAVIYOS
                                  if path != "/api/event-bulk-create-jobs"])
def test_an_empty_2xx_where_klaviyo_answers_an_object_is_an_unexpected_response(
        server: tuple[str, Answers], path: str) -> None:
    """Every call but bulk events answers 200/201/202 with its JSON object: an empty one is not
    Klaviyo's (the SDK raised AttributeError on it)."""
    url, answers = server
    answers.next[path] = (202 if path == "/api/profile-bulk-import-jobs" else 200,
                          [("Content-Type", JSON_API)], b"")
    client = KlaviyoClient(API_KEY, test_host=url)

    with pytest.raises(KlaviyoCallError) as raised:
        calls(client)[path]()

    assert raised.value.failure.label == "unexpected_response"


def test_a_page_on_the_key_check_is_one_warning_line_without_the_key(
        server: tuple[str, Answers]) -> None:
    url, answers = server
    for headers in ([("Content-Type", "text/html")], [("Content-Type", "application/json")]):
        answers.next["/api/profiles"] = (200, headers, b"<html>\n<p>log in</p>\n</html>")

        warning = check_api_key(ApiKeySource(None, API_KEY, None), base_url=url, environ={})

        assert warning is not None
        assert warning.startswith("could not check the Klaviyo API key (HTTP 200 ")
        assert "\n" not in warning and API_KEY not in warning


@pytest.mark.parametrize("status", [200, 400, 503])
@pytest.mark.parametrize("offset", [0, 470, 480, 490])
def test_an_answer_that_echoes_the_key_leaves_none_of_it_in_the_failure(
        server: tuple[str, Answers], status: int, offset: int) -> None:
    """A proxy that echoes the request's Authorization header (in its error, in a header of its
    page): the key is in no part of the failure, not even cut where the summary is clipped at
    500 characters."""
    url, answers = server
    echo = "x" * offset + f"Authorization: Klaviyo-API-Key {API_KEY}"
    error = {"errors": [{"id": "1", "status": status, "code": "invalid", "title": echo,
                         "detail": echo, "source": {"pointer": f"/data/{echo}"},
                         "meta": {"echo": echo}}]}
    body, content_type = ((b"<html>proxy</html>", f"text/html; {echo}") if status == 200
                          else (json.dumps(error).encode(), JSON_API))
    answers.next["/api/profile-import"] = (status, [("Content-Type", content_type)], body)
    client = KlaviyoClient(API_KEY, test_host=url)

    with pytest.raises(KlaviyoCallError) as raised:
        client.create_or_update_profile(UPSERT)

    failure = raised.value.failure
    text = repr(failure) + str(raised.value)
    assert API_KEY[:4] not in text, text  # not even its first secret character
    if offset == 0:  # not clipped away: shown as ***
        assert "Klaviyo-API-Key ***" in failure.summary


def sender_to(url: str) -> Any:
    from transforms.klaviyo.rate_limit import RateLimiter
    from transforms.klaviyo.retry import Retrier, RetryPolicy
    from transforms.klaviyo.sender import KlaviyoSender

    return KlaviyoSender(KlaviyoClient(API_KEY, test_host=url), RateLimiter(None),
                         Retrier(RetryPolicy(first_backoff_seconds=0.01,
                                             max_backoff_seconds=0.02)), None)


@pytest.mark.parametrize("body", [b"{}", b'{"data": {}}', b'{"data": {"id": null}}',
                                  b'{"data": []}', b'{"status": "ok"}'])
def test_a_json_object_without_what_klaviyo_answers_is_an_unexpected_response(
        server: tuple[str, Answers], body: bytes) -> None:
    """A JSON object that is not the endpoint's answer (a proxy's `{"status": "ok"}`): a bulk
    import without the job's id, a job without its status, a profile import without the
    profile crashed the flush (KeyError, TypeError) or was taken as stored. Each is retried
    like a 5xx; the real answer that follows is taken."""
    import time

    from transforms.klaviyo.sender import Delivered, ImportJob

    url, answers = server
    sender = sender_to(url)
    deadline = time.monotonic() + 30
    upsert = ("create_or_update_profile", UPSERT)

    answers.next["/api/profile-import"] = (200, [("Content-Type", JSON_API)], body)
    assert sender.send_profile(upsert, deadline=deadline) == Delivered()
    answers.next["/api/profile-bulk-import-jobs"] = (202, [("Content-Type", JSON_API)], body)
    jobs, outcomes = sender.start_profile_import([upsert], deadline=deadline)
    assert (jobs, outcomes) == ([(ImportJob("job-1", 1), [0])], {})
    answers.next["/api/profile-bulk-import-jobs/job-1"] = (200, [("Content-Type", JSON_API)],
                                                           body)
    polled = sender.poll_profile_import(ImportJob("job-1", 1), [upsert], deadline=deadline)
    assert polled is not None and polled[0].__class__.__name__ == "Pending"
    assert polled[0].failure.label == "unexpected_response"
    assert not answers.next  # each fault was answered, then Klaviyo's answer
    assert answers.asked == ["/api/profile-import"] * 2 + ["/api/profile-bulk-import-jobs"] * 2 \
        + ["/api/profile-bulk-import-jobs/job-1"]


@pytest.mark.parametrize("path", ["/api/profile-bulk-import-jobs/job-1/import-errors",
                                  "/api/profiles"])
def test_a_page_without_its_data_list_is_an_unexpected_response(
        server: tuple[str, Answers], path: str) -> None:
    """`{}` for a page of import errors read as "no errors" (every profile of the job taken
    for imported), for the key check as a good key."""
    url, answers = server
    answers.next[path] = (200, [("Content-Type", JSON_API)], b'{"links": {}}')
    client = KlaviyoClient(API_KEY, test_host=url)

    with pytest.raises(KlaviyoCallError) as raised:
        calls(client)[path]()

    assert raised.value.failure.label == "unexpected_response"
