"""Reading the conformance cases and comparing planned calls the way their README says.

The cases live in `tests/conformance_data/` (a copy of the shared reference cases, so that a fresh
clone tests itself); `WALKEROS_CONFORMANCE_DIR` points elsewhere, and `test_conformance_copy.py`
checks the copy against `../shared/conformance/` when that folder is present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFORMANCE_DIR = Path(os.environ.get(
    "WALKEROS_CONFORMANCE_DIR", Path(__file__).resolve().parent / "conformance_data"))
SHARED_CONFORMANCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "conformance"
SETS = ("steps", "probes", "public")


def load_cases(name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(case, expected) pairs of one set, in file order."""
    def read(kind: str) -> list[dict[str, Any]]:
        with open(CONFORMANCE_DIR / f"{name}.{kind}.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    cases, expected = read("cases"), read("expected")
    assert [c["id"] for c in cases] == [e["id"] for e in expected], f"{name}: ids differ"
    return list(zip(cases, expected, strict=True))


# The reference harness recorded calls with a serializer that writes an object it has already
# written (the same JavaScript object reached twice, e.g. `globals` mapped into properties and
# also inside the whole event) as this marker. JSON.stringify on the wire writes it in full.
REPEATED_OBJECT = "[circular]"


def _containers(value: Any) -> list[Any]:
    found = []
    if isinstance(value, dict | list):
        found.append(value)
        for item in value.values() if isinstance(value, dict) else value:
            found.extend(_containers(item))
    return found


def calls_equal(got: list[Any], want: list[Any]) -> bool:
    """Planned calls equal expected ones; a repeated-object marker in `want` matches an object or
    array that occurs in the same body at least twice."""
    if len(got) != len(want):
        return False
    for got_call, want_call in zip(got, want, strict=True):
        repeated = _containers(got_call[1])
        if not json_equal(got_call, want_call, repeated):
            return False
    return True


def json_equal(left: Any, right: Any, repeated: list[Any] | None = None) -> bool:
    """Numbers by value (1 == 1.0); everything else by type and value; key order ignored."""
    if right == REPEATED_OBJECT and repeated is not None and isinstance(left, dict | list):
        return sum(1 for item in repeated if json_equal(item, left)) >= 2
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(
            json_equal(v, right[k], repeated) for k, v in left.items())
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(
            json_equal(a, b, repeated) for a, b in zip(left, right, strict=True))
    return type(left) is type(right) and left == right
