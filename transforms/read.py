"""Stage `read`: JSON Lines files → one `bytes` element per non-blank line; and what the local
runner needs to pull large Pub/Sub messages from the emulator (end of this module).

Beam's ReadFromText decodes every line as UTF-8 in its coder, so one bad byte fails the whole
run (and leaves the write step's `beam-temp-*` folder behind). Here the files are read as bytes
and cut by `transforms.lines.split_lines`, the rule `simulate` uses too; a line that is not UTF-8
is then an ordinary parse dead letter. Compressed files (`.gz`, `.bz2`, …) are read by their
extension, as ReadFromText does.

Each file is read by one worker thread from start to end (no splitting inside a file): reading
and planning are far faster than Klaviyo accepts events, so this is never the bottleneck.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import google.cloud.pubsub as pubsub
import grpc
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from transforms.lines import is_blank, split_lines
from transforms.metrics import counter


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be read, checked before the job starts (a typo in a path must not
    become an empty run), or None."""
    try:
        [result] = FileSystems.match([pattern])
    except OSError as error:  # Beam's BeamIOError is an IOError
        return f"--input {pattern}: {error}"
    if not result.metadata_list:
        return f"--input {pattern}: no file matches"
    return None


class _LinesFn(beam.DoFn):
    def process(self, readable: fileio.ReadableFile) -> Iterator[bytes]:
        with readable.open() as handle:
            for line in split_lines(handle):
                if is_blank(line):
                    counter("blank_lines").inc()
                else:
                    yield line


class ReadJsonLines(beam.PTransform):
    """A file pattern (local or gs://) → its non-blank lines as bytes; blank ones are counted."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.PCollection:
        return (pipeline
                | "match" >> fileio.MatchFiles(self.pattern)
                | "open" >> fileio.ReadMatches()
                | "lines" >> beam.ParDo(_LinesFn()).with_output_types(bytes))


# Pub/Sub accepts messages up to 10 MB, and its real endpoint's client lifts gRPC's receive limit
# (`grpc.max_receive_message_length` -1). Against the emulator (PUBSUB_EMULATOR_HOST) the client
# builds a bare channel that keeps gRPC's default of 4 MB, so the local runner's pull of a larger
# message fails, the message is redelivered, and the run loops on it for ever.
_UNLIMITED = (("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1))


def lift_emulator_receive_limit() -> None:
    """Make the local runner's Pub/Sub reader pull from the emulator without the 4 MB limit.

    The reader (BundleBasedDirectRunner's `_PubSubReadEvaluator`) calls
    `google.cloud.pubsub.SubscriberClient()` with no arguments, so the only way in is that
    name: it is replaced, in this process, by a subclass that gives the emulator channel the
    options the real endpoint's channel has. Nothing changes without the emulator variable, or
    on Dataflow (its reader is native)."""
    if not issubclass(pubsub.SubscriberClient, _EmulatorSubscriberClient):
        pubsub.SubscriberClient = _EmulatorSubscriberClient


class _EmulatorSubscriberClient(pubsub_v1.SubscriberClient):
    """The Pub/Sub subscriber client, with no message size limit on an emulator channel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        host = os.environ.get("PUBSUB_EMULATOR_HOST")
        if host and "transport" not in kwargs:
            channel = grpc.insecure_channel(host, options=_UNLIMITED)
            kwargs["transport"] = SubscriberGrpcTransport(channel=channel)
        super().__init__(*args, **kwargs)
