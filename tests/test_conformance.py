"""Every shared conformance case, planned by `simulate`, matches the reference's calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.simulate import Simulation
from tests.conformance import SETS, calls_equal, load_cases
from transforms.walkeros.config import load_config

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
