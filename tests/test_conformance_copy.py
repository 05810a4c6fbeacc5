"""The repository's copy of the conformance cases is the shared reference set, byte for byte.

A fresh clone has no `../shared`, so the tests read `tests/conformance_data/`. Beside a checkout
that does have the shared folder (a developer's machine, CI), this test fails when the shared cases
were refreshed and the copy was not: `cp ../shared/conformance/*.jsonl tests/conformance_data/`.
"""

from __future__ import annotations

import pytest

from tests.conformance import SETS, SHARED_CONFORMANCE_DIR

FILES = [f"{name}.{kind}.jsonl" for name in SETS for kind in ("cases", "expected")]


@pytest.mark.skipif(not SHARED_CONFORMANCE_DIR.is_dir(), reason="no ../shared/conformance here")
@pytest.mark.parametrize("name", FILES)
def test_copy_matches_shared(name: str) -> None:
    from tests.conformance import CONFORMANCE_DIR

    copy = (CONFORMANCE_DIR / name).read_bytes()
    assert copy == (SHARED_CONFORMANCE_DIR / name).read_bytes(), f"{name}: refresh the copy"
