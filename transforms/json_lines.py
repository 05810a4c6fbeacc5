"""Writing JSON values as JSON Lines: to stdout, to text files, or to windowed files in streaming.

Used by the dry-run output and the dead-letter files. A bounded run writes plain sharded files
(`PREFIX-00000-of-00001.jsonl`). An unbounded run cannot finalise a file at the end of input, so
it writes one set of files per fixed window of element time (for Pub/Sub, the publish time):
`PREFIX-<window start>-<window end>-00000-of-00001.jsonl`, written once the watermark passes the
end of the window.
"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

STDOUT = "-"
WINDOW_SECONDS = 60
SUFFIX = ".jsonl"


def to_json_line(value: Any) -> str:
    """Compact, one line, non-ASCII text as it is; but escaped when the value holds a lone
    surrogate (JSON input may contain `"\\ud800"`), which UTF-8 cannot encode."""
    line = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return line


def _print_line(line: str) -> None:
    # Flushed per line so that a pipe (`| jq`, a test reading the output) sees each line live.
    print(line, flush=True)


class WriteJsonLines(beam.PTransform):
    """JSON values → `destination`: `-` for stdout, else a file path prefix (local or gs://)."""

    def __init__(self, destination: str, *, streaming: bool) -> None:
        super().__init__()
        self.destination = destination
        self.streaming = streaming

    def expand(self, values: beam.PCollection) -> beam.PCollection:
        lines = values | "to_json" >> beam.Map(to_json_line)
        if self.destination == STDOUT:
            return lines | "print" >> beam.Map(_print_line)
        if not self.streaming:
            return lines | "write" >> beam.io.WriteToText(self.destination, file_name_suffix=SUFFIX)
        directory, prefix = FileSystems.split(self.destination)
        return (lines
                | "window" >> beam.WindowInto(window.FixedWindows(WINDOW_SECONDS))
                | "write" >> fileio.WriteToFiles(
                    path=directory or ".",
                    file_naming=fileio.default_file_naming(prefix, SUFFIX)))
