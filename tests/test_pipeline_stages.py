"""The stages on hand-made Pub/Sub messages (batch, FnApiRunner): Pub/Sub ids and publish times
as fallbacks (D4, D5), pre-flight dead letters (D6), counted skips, unexpected failures."""

from __future__ import annotations

import datetime
import json
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.timestamp import Timestamp

from pipeline.assembly import PlanCalls
from pipeline.run_job import counter_totals
from transforms.dead_letters import DeadLetterRecord
from transforms.dry_run import dry_run_records
from transforms.parse import Parse, envelope_of
from transforms.walkeros.config import load_config

CONFIG = load_config({
    "consent": {"marketing": True},
    "settings": {"identify": {"map": {"firstName": "data.firstName"}}},
    "mapping": {"page": {"view": {"ignore": True}}},
}).config
NOW_S = 1_764_400_000.0
USER, USER2, USER3 = ({"id": f"u-{n}", "email": f"u{n}@example.org"} for n in (7, 8, 9))
PUBLISHED = datetime.datetime(2025, 11, 28, 10, 0, 0, 123_000, tzinfo=datetime.UTC)


def _message(event: Any, message_id: str, ordering_key: str | None = None,
             **attributes: str) -> PubsubMessage:
    data = event if isinstance(event, bytes) else json.dumps(event).encode("utf-8")
    return PubsubMessage(data, attributes, message_id=message_id, publish_time=PUBLISHED,
                         ordering_key=ordering_key)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(calls, dead letters, counters) of one run over the messages below."""
    messages = [
        # no id, no timestamp: the message id and the publish time stand in (D4, D5)
        _message({"name": "product view", "data": {"id": "cc"}, "user": USER,
                  "consent": {"marketing": True}}, "m-1"),
        # before 2000: Klaviyo would reject the event (D6); the upsert still goes
        _message({"name": "user login", "id": "e-2", "timestamp": 900_000_000_000,
                  "data": {"firstName": "Ana"}, "user": USER2,
                  "consent": {"marketing": True}}, "m-2", "user-8", src="web"),
        _message({"name": "product add", "id": "e-3", "timestamp": 946_684_800_000,
                  "user": USER3, "consent": {"marketing": True}}, "m-3"),  # 2000-01-01: ok
        _message({"name": "product view", "id": "e-4", "user": USER, "consent": {}}, "m-4"),
        _message({"name": "product view", "id": "e-5", "consent": {"marketing": True}}, "m-5"),
        _message({"name": "page view", "id": "e-6", "user": USER,
                  "consent": {"marketing": True}}, "m-6"),
        _message(b"[" * 100_000, "m-7"),  # too deep for a JSON parser: an invalid event
    ]
    out = tmp_path_factory.mktemp("stages")
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    calls, dead = pipeline | beam.Create(messages) | PlanCalls(
        CONFIG, ttl_seconds=86_400, clock=lambda: NOW_S)
    (calls | "flatten" >> beam.Flatten() | "calls" >> beam.FlatMap(dry_run_records)
     | "calls_json" >> beam.Map(json.dumps)
     | "write_calls" >> beam.io.WriteToText(str(out / "calls")))
    dead | "dead" >> beam.Map(DeadLetterRecord.to_json) | "dead_json" >> beam.Map(json.dumps) | \
        "write_dead" >> beam.io.WriteToText(str(out / "dead"))
    result = pipeline.run()
    result.wait_until_finish()

    def read(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for path in sorted(out.glob(f"{name}-*"))
                for line in path.read_text(encoding="utf-8").splitlines()]

    return read("calls"), read("dead"), counter_totals(result)


def test_message_id_and_publish_time_are_the_fallbacks(run: Any) -> None:
    calls, _, _ = run
    [call] = [c for c in calls if c["event_id"] == "m-1" and c["method"] == "create_event"]
    attributes = call["body"]["data"]["attributes"]
    assert attributes["unique_id"] == "m-1"
    assert attributes["time"] == "2025-11-28T10:00:00.123Z"


def test_a_call_klaviyo_would_reject_is_a_dead_letter_the_rest_goes(run: Any) -> None:
    calls, dead, _ = run
    assert [c["method"] for c in calls if c["event_id"] == "e-2"] == ["create_or_update_profile"]
    assert sorted(c["method"] for c in calls if c["event_id"] == "e-3") == [
        "create_event", "create_or_update_profile"]
    [letter] = [d for d in dead if d["stage"] == "preflight"]
    assert letter["event_id"] == "e-2" and letter["message_id"] == "m-2"
    assert letter["attributes"] == {"src": "web"}
    assert letter["ordering_key"] == "user-8"  # kept through the identify state's shuffle
    assert letter["call"]["method"] == "create_event"
    assert "before 2000-01-01" in letter["reason"]
    assert json.loads(letter["payload"])["id"] == "e-2"
    assert letter["publish_time"] == "2025-11-28T10:00:00.123Z"


def test_input_too_deep_to_parse_is_a_dead_letter(run: Any) -> None:
    _, dead, _ = run
    [letter] = [d for d in dead if d["stage"] == "parse"]
    assert letter["message_id"] == "m-7"
    assert letter["reason"] == "invalid JSON: nested too deeply"


_UNEXPECTED: list[dict[str, Any]] = []


def _keep_unexpected(record: DeadLetterRecord) -> None:
    _UNEXPECTED.append(record.to_json())


def test_unexpected_failure_is_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a stage must not stall a stream: the message becomes a dead letter."""
    def broken(payload: bytes) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("transforms.parse.parse_event", broken)  # same process: FnApiRunner
    _UNEXPECTED.clear()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        _, dead = pipeline | beam.Create([_message({"name": "a b"}, "m-9")]) | Parse()
        dead | beam.Map(_keep_unexpected)
    [letter] = _UNEXPECTED
    assert letter["stage"] == "parse" and letter["message_id"] == "m-9"
    assert letter["reason"].startswith("unexpected RuntimeError")


def test_outcomes_are_counted(run: Any) -> None:
    _, _, counters = run
    assert counters == {"events_in": 7, "invalid": 1, "consent": 1, "no_identifier": 1,
                        "ignored": 1,
                        "events_planned": 3, "profiles_planned": 3, "profiles_out_of_range": 1,
                        "dry_run_calls": 5}


def test_an_event_with_nothing_to_send_is_a_counted_skip() -> None:
    """A silent rule (no event) without identify (no upsert) plans no call: counted as such,
    not as an identify-only event, and nothing goes on to the later stages."""
    config = load_config({"mapping": {"page": {"scroll": {"silent": True}}}}).config
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    calls, _ = pipeline | beam.Create([_message(
        {"name": "page scroll", "id": "e-1", "user": USER}, "m-1")]) | PlanCalls(
        config, ttl_seconds=86_400, clock=lambda: NOW_S)
    calls | "flatten" >> beam.Flatten() | "calls" >> beam.FlatMap(dry_run_records)
    result = pipeline.run()
    result.wait_until_finish()

    assert counter_totals(result) == {"events_in": 1, "nothing_to_send": 1}


def test_element_timestamp_stands_in_for_a_missing_publish_time() -> None:
    message = PubsubMessage(b"{}", {}, message_id="m")
    assert envelope_of(message, Timestamp(1_764_000_000)).publish_time_ms == 1_764_000_000_000
    assert envelope_of(message).publish_time_ms is None
    assert envelope_of(_message({}, "m")).publish_time_ms == PUBLISHED.timestamp() * 1000
    assert envelope_of("line", Timestamp(1_764_000_000)).publish_time_ms is None


def _flattened_types(pipeline: beam.Pipeline) -> list[Any]:
    """The element types of every PCollection a Flatten of the pipeline takes in."""
    found: list[Any] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, applied: beam.pipeline.AppliedPTransform) -> None:
            if isinstance(applied.transform, beam.Flatten):
                found.extend(pcoll.element_type for pcoll in applied.inputs)

    pipeline.visit(Visitor())
    return found


@pytest.mark.parametrize("dry_run", [True, False])
def test_outgoing_events_are_never_flattened(dry_run: bool, tmp_path: Any) -> None:
    """FnApiRunner materializes every Flatten of two stages' outputs (transforms/parts.py):
    the identify state's two parts reach the sink unflattened, and the sink flattens lines
    (dry run) or keyed events (its shuffle), never the outgoing events themselves."""
    from pipeline.assembly import build
    from pipeline.options import job_settings
    from transforms.elements import OutgoingEvent

    (tmp_path / "in.jsonl").write_text("{}\n")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--config", "unused.json",
            "--dead_letter_path", str(tmp_path / "dead")]
    argv += (["--dry_run_output", str(tmp_path / "calls")] if dry_run
             else ["--klaviyo_api_key", "pk_test_0123456789abcdef"])
    options = PipelineOptions(argv)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, job_settings(options), CONFIG, runner="FnApiRunner")
    types = _flattened_types(pipeline)
    assert types, "the graph has Flattens (dead letters, lines or keyed events)"
    assert OutgoingEvent not in types



_DEAD: list[dict[str, Any]] = []


def _keep_dead(record: DeadLetterRecord) -> None:
    _DEAD.append(record.to_json())


def test_silent_rules_whose_only_call_is_refused_by_preflight_are_dead_letters() -> None:
    """What `nothing_to_send` must not swallow: a silent rule whose identify body Klaviyo
    would refuse (`location: "Berlin"`) plans a call, so it is identify-only and becomes a
    pre-flight dead letter; a silent rule whose identify resolves to no object plans none.
    The outcomes add up to the events in."""
    config = load_config({
        "settings": {"identify": "data.profile"},
        "mapping": {"user": {"login": {"silent": True}}},
    }).config
    _DEAD.clear()
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    calls, dead = pipeline | beam.Create([
        _message({"name": "user login", "id": "e-1", "user": USER,
                  "data": {"profile": {"location": "Berlin"}}}, "m-1"),
        _message({"name": "user login", "id": "e-2", "user": USER2,
                  "data": {"profile": "Berlin"}}, "m-2"),
    ]) | PlanCalls(config, ttl_seconds=86_400, clock=lambda: NOW_S)
    calls | "flatten" >> beam.Flatten() | "calls" >> beam.FlatMap(dry_run_records)
    dead | "dead" >> beam.Map(_keep_dead)
    result = pipeline.run()
    result.wait_until_finish()

    assert [(d["stage"], d["event_id"], d["call"]["method"]) for d in _DEAD] == [
        ("preflight", "e-1", "create_or_update_profile")]
    counters = counter_totals(result)
    assert {name: counters.get(name) for name in (
        "events_in", "identify_only", "nothing_to_send")} == {
        "events_in": 2, "identify_only": 1, "nothing_to_send": 1}
