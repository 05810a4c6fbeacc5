"""Writing JSON values as JSON Lines: to stdout, to text files, or to windowed files in streaming.

Used by the dry-run output and the dead-letter files. A bounded run writes plain sharded files
(`PREFIX-00000-of-00001.jsonl`). An unbounded run cannot finalise a file at the end of input, so
it writes one set of files per fixed window of the time each line was *written*:
`PREFIX-<window start>-<window end>-00000-of-00001.jsonl`, written once the watermark passes the
end of the window. Written, not published: the element time of a message from a backlog (its
publish time) is already behind the watermark, so its window would be closed and its lines
dropped as late, left in the `.temp*` folder that the window's files are staged in. Each line is
therefore stamped with the current time (never earlier than its own) before it is windowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.lines import to_json_line
from transforms.parts import Parts, as_parts, flatten, label

STDOUT = "-"
WINDOW_SECONDS = 60
SUFFIX = ".jsonl"


def _print_line(line: str) -> None:
    # Flushed per line so that a pipe (`| jq`, a test reading the output) sees each line live.
    print(line, flush=True)


class _StampNow(beam.DoFn):
    """Element time := now, or the element's own time when that is later (module docstring)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def process(self, line: str,
                timestamp: Any = beam.DoFn.TimestampParam,  # Any: see identify_state.py
                ) -> Iterator[window.TimestampedValue]:
        yield window.TimestampedValue(line, max(Timestamp.of(self.clock()), timestamp))


def _itself(value: Any) -> Iterable[Any]:
    return (value,)


class _JsonLines:
    """element → to_values(element) → their JSON lines, in one step: a JSON value holding a lone
    surrogate must never be an element between two steps, where Beam's coder encodes its
    strings as strict UTF-8 and fails the bundle; the line has it escaped."""

    def __init__(self, to_values: Callable[[Any], Iterable[Any]]) -> None:
        self.to_values = to_values

    def __call__(self, element: Any) -> list[str]:
        return [to_json_line(value) for value in self.to_values(element)]


class _JsonLineChunks(beam.DoFn):
    """`_JsonLines` for a bounded file output in the global window: a bundle's lines leave as a
    few elements of up to CHUNK_LINES lines joined by `\\n`, which the text sink writes as
    they are (one record per element, each followed by `\\n`): the same file. Each line costs
    the flatten's encoding, the sink's windowing and its write call once per chunk instead of
    once per line (about 5 µs a line on FnApiRunner). A chunk also ends once it holds
    CHUNK_CHARS characters: lines can be large (a dead letter is up to 9 MB of JSON), and a
    thousand of them would be held, joined and encoded at once (gigabytes)."""

    CHUNK_LINES = 1000
    CHUNK_CHARS = 1_000_000

    def __init__(self, to_values: Callable[[Any], Iterable[Any]]) -> None:
        self._lines = _JsonLines(to_values)
        self._chunk: list[str] = []
        self._chars = 0

    def start_bundle(self) -> None:
        self._chunk = []
        self._chars = 0

    def process(self, element: Any) -> Iterator[str]:
        chunk, chars = self._chunk, self._chars
        for line in self._lines(element):
            chunk.append(line)
            chars += len(line)
        if len(chunk) >= self.CHUNK_LINES or chars >= self.CHUNK_CHARS:
            self._chunk, self._chars = [], 0
            yield "\n".join(chunk)
        else:
            self._chars = chars

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._chunk:
            chunk, self._chunk, self._chars = self._chunk, [], 0
            yield WindowedValue("\n".join(chunk), GlobalWindow().max_timestamp(),
                                (GlobalWindow(),))


class WriteJsonLines(beam.PTransform):
    """Elements (one PCollection or parts: transforms/parts.py) → JSON Lines at `destination`:
    `-` for stdout, else a file path prefix (local or gs://). `to_values` makes each element any
    number of JSON values (default: the element is one already); the parts are flattened as
    lines.

    `clock` (seconds) stamps the lines of a streaming run; tests pass their own."""

    def __init__(self, destination: str, *, streaming: bool,
                 to_values: Callable[[Any], Iterable[Any]] = _itself,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.destination = destination
        self.streaming = streaming
        self.to_values = to_values
        self.clock = clock

    def expand(self, values: beam.PCollection | Parts) -> beam.PCollection:
        parts = as_parts(values)
        # A bounded file output in the global window takes its lines in chunks.
        chunked = self.destination != STDOUT and not self.streaming and all(
            isinstance(part.windowing.windowfn, window.GlobalWindows) for part in parts)

        def to_json() -> beam.PTransform:
            return (beam.ParDo(_JsonLineChunks(self.to_values)) if chunked
                    else beam.FlatMap(_JsonLines(self.to_values))).with_output_types(str)

        lines = flatten(tuple(part | label("to_json", index) >> to_json()
                              for index, part in enumerate(parts)), "lines")
        if chunked:
            return lines | "write" >> beam.io.WriteToText(self.destination,
                                                          file_name_suffix=SUFFIX)
        if self.destination == STDOUT:
            return lines | "print" >> beam.Map(_print_line)
        directory, prefix = FileSystems.split(self.destination)
        return (lines
                | "stamp" >> beam.ParDo(_StampNow(self.clock))
                | "window" >> beam.WindowInto(window.FixedWindows(WINDOW_SECONDS))
                | "write" >> fileio.WriteToFiles(
                    path=directory or ".",
                    file_naming=fileio.default_file_naming(prefix, SUFFIX)))
