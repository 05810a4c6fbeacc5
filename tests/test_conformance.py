"""Every shared conformance case, planned by `simulate`, matches the reference's calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_client.models import EventCreateQueryV2, ProfileUpsertQuery

from pipeline.simulate import Simulation
from tests.conformance import SETS, calls_equal, load_cases
from transforms.walkeros.config import load_config

NOW = 1_764_400_000_000
CASES = [pytest.param(case, expected, id=case["id"])
         for name in SETS for case, expected in load_cases(name)]


@pytest.mark.parametrize(("case", "expected"), CASES)
def test_case_matches_reference(case: dict[str, Any], expected: dict[str, Any]) -> None:
    simulation = Simulation(load_config(case["config"]).config)
    compared = 0
    for index, (event, want) in enumerate(zip(case["events"], expected["events"], strict=True)):
        got = simulation.step(event)
        if want.get("compare") is False:
            continue
        compared += 1
        assert calls_equal(got["calls"], want["calls"]), (
            f"event {index}: {json.dumps(event)[:300]}\n"
            f"got:  {json.dumps(got['calls'])}\nwant: {json.dumps(want['calls'])}\n"
            f"skipped={got['skipped']} problems={got['problems']}")
    assert compared or not case["events"]


def test_all_sets_present() -> None:
    assert len(CASES) >= 300


def test_planned_bodies_without_problems_are_accepted_by_the_sdk() -> None:
    """Every call planned for the conformance events that pre-flight passes is a body the
    official SDK's request models accept, so the SDK never refuses a whole bulk request."""
    models = {"create_event": EventCreateQueryV2, "create_or_update_profile": ProfileUpsertQuery}
    checked = flagged = 0
    for param in CASES:
        case = param.values[0]
        simulation = Simulation(load_config(case["config"]).config)
        for event in case["events"]:
            for call in simulation.plan(event, now_ms=NOW)[1]:
                if call.problems:
                    flagged += 1
                    continue
                models[call.method].model_validate(call.body)
                checked += 1
    assert checked > 500 and flagged > 0
