"""The Beam stages plan, for every shared conformance case, the calls `simulate` plans.

One batch pipeline (FnApiRunner) runs all cases: a branch per case would take minutes to build,
so each record carries its case and index as attributes, a test DoFn plans it with its case's
config (the production DoFn's routing, `route`), and profile keys are scoped by case so that the
identify states of cases stay apart, as in one run per case. Parse, identify_state and preflight
are the production transforms.

How the calls are compared, per case and event (the record's attributes give the event):
- invalid events: dead-lettered (parse or plan) exactly where `simulate` skips them as invalid;
- `create_event` calls: equal to `simulate`'s for the same event. They do not depend on state;
- profile upserts: they depend on the order in which a key's events reach the identify state,
  which Beam does not define. `simulate` applies port.md D1 in file order; the pipeline must
  give the upserts of D1 applied in *some* order of that key's events. The test first compares
  with file order (what the local runner does in practice) and otherwise searches the other
  orders of that key's identify events (at most a few per key, so the search is exhaustive);
- every call with pre-flight problems is a dead letter of stage `preflight`, and the calls
  compared are those sent plus those dead-lettered there, as `simulate` lists both.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput

from pipeline.simulate import Simulation
from tests.conformance import SETS, load_cases
from transforms.dead_letters import DEAD_LETTERS, PARSE, PLAN, PREFLIGHT, DeadLetterRecord
from transforms.elements import OutgoingEvent, ParsedEvent, PlannedEvent
from transforms.identify_state import ApplyIdentifyState
from transforms.klaviyo.identify_state import IdentifyState, Verdict, decide, ordering_time
from transforms.klaviyo.plan import INVALID_EVENT, Planner
from transforms.parse import Parse
from transforms.plan import route
from transforms.preflight import Preflight
from transforms.walkeros.config import load_config
from transforms.walkeros.jsvalues import canonical_json

NOW_MS = 1_800_000_000_000.0  # one processing time for both sides (D5 fallback, D6 checks)
CASES = [case for name in SETS for case, _ in load_cases(name)]
MAX_IDENTIFY_EVENTS_PER_KEY = 8  # beyond this the search over orders would be too slow
Call = tuple[str, str]  # (method, canonical body)


def _line(event: Any) -> str:
    return json.dumps(event)  # ASCII: some cases hold lone surrogates


class _PlanEachCaseFn(beam.DoFn):
    def setup(self) -> None:
        self.planners = {case["id"]: Planner(load_config(case["config"]).config)
                         for case in CASES}

    def process(self, parsed: ParsedEvent) -> Iterator[PlannedEvent | TaggedOutput]:
        case_id = parsed.envelope.attributes["case"]
        plan = self.planners[case_id].plan(parsed.event, now_ms=NOW_MS)
        if plan.profile_key is not None:
            plan.profile_key = f"{case_id}\n{plan.profile_key}"
        yield from route(parsed.envelope, plan)


def _sent(outgoing: OutgoingEvent) -> Iterator[dict[str, Any]]:
    """The calls a fresh sink sends for the event (hints are not sent by a fresh sink)."""
    attributes = outgoing.envelope.attributes
    for call in outgoing.planned_calls():
        yield {"case": attributes["case"], "index": int(attributes["index"]),
               "method": call.method, "body": call.body, "problems": []}


def _dead(record: DeadLetterRecord) -> dict[str, Any]:
    attributes = record.envelope.attributes
    call = record.call
    return {"case": attributes["case"], "index": int(attributes["index"]),
            "stage": record.stage, "method": call and call.method, "body": call and call.body,
            "problems": list(call.problems) if call else []}


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    messages = [PubsubMessage(_line(event).encode("utf-8"),
                              {"case": case["id"], "index": str(index)})
                for case in CASES for index, event in enumerate(case["events"])]
    prefix = tmp_path_factory.mktemp("conformance") / "out"
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as pipeline:
        events, parse_dead = pipeline | beam.Create(messages) | "parse" >> Parse()
        planned = events | "plan" >> beam.ParDo(_PlanEachCaseFn()).with_outputs(
            DEAD_LETTERS, main="planned")
        calls, state_dead = planned.planned | "identify_state" >> ApplyIdentifyState(
            ttl_seconds=30 * 86_400, clock=lambda: NOW_MS / 1000)
        ready, preflight_dead = calls | "preflight" >> Preflight()
        dead = (parse_dead, planned[DEAD_LETTERS], state_dead, *preflight_dead) | \
            "dead" >> beam.Flatten()
        sent = ready | "ready" >> beam.Flatten() | "sent" >> beam.FlatMap(_sent)
        ((sent, dead | "dead_json" >> beam.Map(_dead))
         | beam.Flatten()
         | beam.Map(json.dumps)
         | beam.io.WriteToText(str(prefix)))
    return [json.loads(line) for path in sorted(Path(prefix).parent.glob("out*"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def _upserts_in_some_order(candidates: list[tuple[int, dict[str, Any], float]],
                           sent: set[int]) -> bool:
    """Whether D1, applied to one key's identify events in some order, sends exactly the
    upserts of the events in `sent`."""
    assert len(candidates) <= MAX_IDENTIFY_EVENTS_PER_KEY, "too many orders to search"
    for order in itertools.permutations(candidates):
        state: IdentifyState | None = None
        sent_here = set()
        for index, body, timestamp in order:
            order_ms = ordering_time(timestamp, NOW_MS, 300_000)
            state, verdict = decide(state, body, order_ms, timestamp_ms=timestamp)
            if verdict in (Verdict.CHANGED, Verdict.OUT_OF_RANGE):
                sent_here.add(index)
        if sent_here == sent:
            return True
    return False


def _calls(records: list[dict[str, Any]], method: str) -> list[Call]:
    return sorted((r["method"], canonical_json(r["body"])) for r in records
                  if r["method"] == method)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_pipeline_plans_what_simulate_plans(
    case: dict[str, Any], pipeline_output: list[dict[str, Any]]
) -> None:
    records: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in pipeline_output:
        if record["case"] == case["id"]:
            records[record["index"]].append(record)
    simulation = Simulation(load_config(case["config"]).config)
    planner = Planner(load_config(case["config"]).config)
    candidates: dict[str, list[tuple[int, dict[str, Any], float]]] = defaultdict(list)
    sent_by_key: dict[str, set[int]] = defaultdict(set)
    simulated_by_key: dict[str, set[int]] = defaultdict(set)
    for index, event in enumerate(case["events"]):
        line = _line(event)
        want = simulation.step(line, now_ms=NOW_MS)
        got = records[index]
        stages = {r.get("stage") for r in got} - {None}
        where = f"event {index}: {line[:200]}"
        if want["skipped"] == INVALID_EVENT:
            assert stages & {PARSE, PLAN}, f"{where}: not dead-lettered as invalid: {got}"
            continue
        assert not stages & {PARSE, PLAN}, f"{where}: dead-lettered: {got}"
        assert all(r["problems"] for r in got if r.get("stage") == PREFLIGHT), where
        want_records = [{"method": method, "body": body} for method, body in want["calls"]]
        assert _calls(got, "create_event") == _calls(want_records, "create_event"), where
        plan = planner.plan(line, now_ms=NOW_MS)
        if plan.profile is None:
            assert not _calls(got, "create_or_update_profile"), where
            continue
        assert plan.profile_key is not None and plan.timestamp_ms is not None
        candidates[plan.profile_key].append((index, plan.profile.body, plan.timestamp_ms))
        if _calls(got, "create_or_update_profile"):
            assert _calls(got, "create_or_update_profile") == [
                ("create_or_update_profile", canonical_json(plan.profile.body))], where
            sent_by_key[plan.profile_key].add(index)
        if _calls(want_records, "create_or_update_profile"):
            simulated_by_key[plan.profile_key].add(index)
    for key, events in candidates.items():
        if sent_by_key[key] != simulated_by_key[key]:
            assert _upserts_in_some_order(events, sent_by_key[key]), (
                f"key {key!r}: upserts for events {sorted(sent_by_key[key])}, which no order "
                f"of its events gives (simulate: {sorted(simulated_by_key[key])})")



def test_the_order_search_accepts_only_what_some_order_gives() -> None:
    older, newer = (0, {"a": 1}, 1.7e12), (1, {"a": 2}, 1.7e12 + 1)
    assert _upserts_in_some_order([older, newer], {0, 1})  # file order
    assert _upserts_in_some_order([older, newer], {1})  # newer first: the older is not sent
    assert not _upserts_in_some_order([older, newer], {0})
