"""WriteJsonLines in a bounded run: the lines written are exactly the values' lines, whether they
leave the to_json step in chunks (global window) or one by one (any other window)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms import window

from transforms.json_lines import WriteJsonLines, _JsonLineChunks
from transforms.lines import to_json_line


def _values(number: int) -> list[dict[str, Any]]:
    """Zero, one or two values per element, so that chunks end anywhere."""
    return [{"n": number, "copy": copy} for copy in range(number % 3)]


def _written_lines(folder: Path) -> Counter[str]:
    lines: Counter[str] = Counter()
    for path in folder.glob("out*.jsonl"):
        lines.update(path.read_text(encoding="utf-8").splitlines())
    return lines


def _write(folder: Path, numbers: range, to_values: Callable[[int], list[Any]],
           windowed: bool) -> None:
    """Two parts (the even numbers and the odd), each in fixed windows if `windowed`, written
    as JSON Lines files `out*` in `folder` by a bounded run."""
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions()) as pipeline:
        first = pipeline | "first" >> beam.Create([n for n in numbers if n % 2 == 0])
        second = pipeline | "second" >> beam.Create([n for n in numbers if n % 2 == 1])
        if windowed:
            first = first | "window" >> beam.WindowInto(window.FixedWindows(60))
            second = second | "window_1" >> beam.WindowInto(window.FixedWindows(60))
        (first, second) | WriteJsonLines(str(folder / "out"), streaming=False,
                                         to_values=to_values)


@pytest.mark.parametrize("windowed", [False, True])
def test_every_line_is_written_once(tmp_path: Path, windowed: bool) -> None:
    """Two parts, more lines than a chunk holds: each value's line once, nothing else (no
    blank line where an element had no values, none joined with another)."""
    numbers = range(2 * _JsonLineChunks.CHUNK_LINES + 345)
    expected = Counter(to_json_line(value) for number in numbers for value in _values(number))
    _write(tmp_path, numbers, _values, windowed)
    assert _written_lines(tmp_path) == expected


# Values whose lines are easy to get wrong: characters that some readers take for line ends
# (JSON escapes only the control characters), a lone surrogate (escaped), an integer orjson
# refuses, a non-finite number, a key that is not a string, empty containers.
_TRICKY = [
    {"text": "a\nb\r\nc\rd"}, {"text": "\u2028\u2029\x85\x0b\x0c\x1c"}, {"text": "\ud800"},
    {"\udfff": "key"}, {"big": 2 ** 70}, {"nan": float("nan"), "inf": float("inf")},
    {1: "int key"}, {}, [], "", "ünïcödé ✓", {"nested": [{"deep": ["\n"]}]},
]


def _tricky(number: int) -> list[Any]:
    return [_TRICKY[number % len(_TRICKY)]] * (number % 3)


def _written_bytes(folder: Path) -> Counter[bytes]:
    """The files' lines as bytes, cut at `\\n` only (what a JSON Lines reader does)."""
    lines: Counter[bytes] = Counter()
    for path in folder.glob("out*.jsonl"):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n")
        lines.update(data.split(b"\n")[:-1] if data else [])
    return lines


@pytest.mark.parametrize("windowed", [False, True])
def test_tricky_values_are_written_byte_for_byte(tmp_path: Path, windowed: bool) -> None:
    """No line holds a `\\n`, so chunks joined by it are cut back into the same lines: the
    files hold each value's UTF-8 line once, chunked (global window) or per line."""
    numbers = range(_JsonLineChunks.CHUNK_LINES + 77)
    expected = Counter(to_json_line(value).encode("utf-8")
                       for number in numbers for value in _tricky(number))
    assert not any(b"\n" in line or b"\r" in line for line in expected)
    _write(tmp_path, numbers, _tricky, windowed)
    assert _written_bytes(tmp_path) == expected


def _run_bundle(chunks: _JsonLineChunks, elements: list[Any]) -> list[str]:
    """One bundle on a DoFn instance, as the runner drives it: what it emits."""
    chunks.start_bundle()
    emitted: list[str] = []
    for element in elements:
        emitted.extend(chunks.process(element))
    emitted.extend(value.value for value in chunks.finish_bundle())
    return emitted


def test_a_chunk_holds_a_bounded_number_of_characters() -> None:
    """Lines can be large (a dead letter is up to 9 MB of JSON, dead_letters.MAX_RECORD_BYTES):
    a chunk ends once it holds about a million characters, however few lines that is, so that
    a bundle of large lines is never held (and joined, and encoded) a thousand at a time."""
    big = "x" * 100_000
    chunks = _JsonLineChunks(lambda number: [{"n": number, "big": big}])

    emitted = _run_bundle(chunks, list(range(200)))

    assert Counter(line for chunk in emitted for line in chunk.split("\n")) == Counter(
        to_json_line({"n": number, "big": big}) for number in range(200))
    longest_line = len(to_json_line({"n": 199, "big": big}))
    assert max(len(chunk) for chunk in emitted) <= 1_000_000 + longest_line


def test_a_bundle_that_failed_leaves_nothing_in_the_next() -> None:
    """A runner may start a bundle again on the instance whose bundle failed: the lines
    buffered before the failure are not written with the next bundle's."""
    chunks = _JsonLineChunks(lambda number: [{"n": number}])
    chunks.start_bundle()
    for number in range(10):
        list(chunks.process(number))  # the bundle fails here: no finish_bundle

    emitted = _run_bundle(chunks, [100, 101])

    assert [line for chunk in emitted for line in chunk.split("\n")] == [
        to_json_line({"n": 100}), to_json_line({"n": 101})]
