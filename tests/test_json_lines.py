"""WriteJsonLines in a bounded run: the lines written are exactly the values' lines, whether they
leave the to_json step in chunks (global window) or one by one (any other window)."""

from __future__ import annotations

from collections import Counter
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


@pytest.mark.parametrize("windowed", [False, True])
def test_every_line_is_written_once(tmp_path: Path, windowed: bool) -> None:
    """Two parts, more lines than a chunk holds: each value's line once, nothing else (no
    blank line where an element had no values, none joined with another)."""
    numbers = range(2 * _JsonLineChunks.CHUNK_LINES + 345)
    expected = Counter(to_json_line(value) for number in numbers for value in _values(number))
    with beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions()) as pipeline:
        first = pipeline | "first" >> beam.Create([n for n in numbers if n % 2 == 0])
        second = pipeline | "second" >> beam.Create([n for n in numbers if n % 2 == 1])
        if windowed:
            first = first | "window" >> beam.WindowInto(window.FixedWindows(60))
            second = second | "window_1" >> beam.WindowInto(window.FixedWindows(60))
        (first, second) | WriteJsonLines(str(tmp_path / "out"), streaming=False,
                                         to_values=_values)
    assert _written_lines(tmp_path) == expected
