"""Local batch runs in bounded memory: a large input split by profile into runs, one by one.

FnApiRunner, the local batch runner, holds every element of a stage in memory (4.5 KB per input
event measured: 1.35 GB at 300,000 events, so a million would not fit in 2 GB). Everything the
job keeps is per profile key: the identify state decides per key, and the sink keys a profile's
upsert and its events together and keeps newest wins per profile. A run over a subset of
profiles that holds *all* events of those profiles therefore ends, for them, exactly as one run
over everything would. So:

1. **Split** (constant memory): the input files are read line by line, cut as the job cuts them
   (`transforms.lines.split_lines`), and each line is appended to one of K partition files by a
   stable hash of its profile key, found by the pure planner the job uses
   (`transforms.klaviyo.plan.Planner`). A line without a profile key (blank, invalid, skipped by
   consent or a rule, no identifier) touches no state and goes by a hash of the line itself.
2. **Run** the normal job (`pipeline.assembly.build`) once per partition, sequentially, with the
   same options: dead-letter and dry-run files get a `-part-I-of-K` suffix on their prefix, so
   no run overwrites another's, and the caller adds up the counters.

The partition files are byte-exact: each line is written with `\\r\\n` (split_lines then removes
exactly that, so a line ending in a bare `\\r` keeps it) and a partition file starts with a UTF-8
BOM (dropped by split_lines, so a BOM that starts a line in the middle of an input file stays
content). The hash is not the sink's `crc32 % sink_shards`: partitions cut along that one would
give all profiles of a partition the same sink shard and send with one thread.

K is `ceil(lines / DEFAULT_PARTITION_EVENTS)` (lines counted in a quick first read) unless
`--local_partitions` sets it; only FnApiRunner runs over files are split.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from apache_beam.io.filesystems import FileSystems

from pipeline.assembly import without_api_key
from pipeline.options import JobSettings, OptionsError
from transforms.json_lines import STDOUT
from transforms.klaviyo.plan import Planner
from transforms.lines import BOM, is_blank, split_lines
from transforms.read import pattern_problem

BATCH_RUNNER = "FnApiRunner"
# Events per run when K is automatic: a peak RSS of about 0.6 GB (bench/local_backfill_memory.py).
DEFAULT_PARTITION_EVENTS = 100_000
_CHUNK = 1 << 20
_WRITE_BUFFER = 1 << 20


def input_paths(pattern: str) -> list[str]:
    """The files `pattern` matches (local or gs://), in a fixed order; an `OptionsError` if
    none, as the job's own read would refuse it."""
    problem = pattern_problem(pattern)
    if problem:
        raise OptionsError(problem)
    [result] = FileSystems.match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


def count_lines(paths: list[str]) -> int:
    """Lines in the files (blank ones included), read in large chunks without parsing."""
    lines = 0
    for path in paths:
        with FileSystems.open(path) as handle:
            last = b"\n"
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                lines += chunk.count(b"\n")
                last = chunk
            lines += not last.endswith(b"\n")  # a last line without its newline
    return lines


def partition_count(settings: JobSettings, runner: str) -> int:
    """How many runs the job is split into: 1 (no split) except for FnApiRunner over files."""
    chosen = settings.local_partitions
    if settings.source_kind != "files" or runner != BATCH_RUNNER:
        if chosen > 1:
            raise OptionsError(f"--local_partitions is for local batch runs over files "
                               f"(runner {BATCH_RUNNER}), not {runner}")
        return 1
    if chosen:
        return chosen
    return max(1, math.ceil(count_lines(input_paths(settings.source)) / DEFAULT_PARTITION_EVENTS))


def _stable_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"partition").digest(),
                          "big")


class Partitioner:
    """Which partition a line of input belongs to: all lines of one profile key to the same."""

    def __init__(self, config: dict[str, Any], count: int, *, now_ms: float) -> None:
        self.planner = Planner(config)
        self.count = count
        self.now_ms = now_ms

    def profile_key(self, line: bytes) -> str | None:
        """The line's profile key as the job's plan stage finds it, or None (a line the job
        dead-letters, skips or cannot plan touches no per-profile state)."""
        if is_blank(line):
            return None
        try:
            return self.planner.plan(line, now_ms=self.now_ms).profile_key
        except Exception:  # noqa: BLE001 - the job dead-letters it (dead_letters.unexpected)
            return None

    def __call__(self, line: bytes) -> int:
        key = self.profile_key(line)
        data = line if key is None else b"key:" + key.encode("utf-8", "surrogatepass")
        return _stable_hash(data) % self.count


@dataclass(frozen=True)
class Partition:
    """One partition file of a split input and the lines it holds."""

    path: Path
    lines: int


def split_input(paths: list[str], partitioner: Partitioner, directory: Path
                ) -> list[Partition]:
    """Write each line of the files to its partition file in `directory`; the partitions that
    got at least one line, in order (module docstring: the files are byte-exact)."""
    files = [directory / f"part-{index:05d}.jsonl" for index in range(partitioner.count)]
    handles: list[BinaryIO | None] = [None] * partitioner.count
    lines = [0] * partitioner.count
    with ExitStack() as stack:
        for path in paths:
            with FileSystems.open(path) as source:
                for line in split_lines(source):
                    index = partitioner(line)
                    handle = handles[index]
                    if handle is None:
                        handle = stack.enter_context(open(files[index], "wb",
                                                          buffering=_WRITE_BUFFER))
                        handle.write(BOM)
                        handles[index] = handle
                    handle.write(line + b"\r\n")
                    lines[index] += 1
    return [Partition(file, count) for file, count in zip(files, lines, strict=True) if count]


@dataclass(frozen=True)
class Run:
    """One of the runs of a split job: `index` of `count`, over `lines` lines of input."""

    index: int
    count: int
    lines: int
    settings: JobSettings


def _suffixed(prefix: str | None, suffix: str) -> str | None:
    return prefix if prefix is None or prefix == STDOUT else prefix + suffix


def partition_settings(settings: JobSettings, path: Path, index: int, count: int
                       ) -> JobSettings:
    """One run's settings: the partition file as input, its own output file prefixes."""
    width = len(str(count))
    suffix = f"-part-{index:0{width}d}-of-{count}"
    return dataclasses.replace(
        settings, source=str(path), local_partitions=1,
        dead_letter_path=_suffixed(settings.dead_letter_path, suffix),
        dry_run_output=_suffixed(settings.dry_run_output, suffix))


@contextmanager
def partitioned(settings: JobSettings, config: dict[str, Any], count: int
                ) -> Iterator[Iterator[Run]]:
    """The runs over a temporary split of the input into `count` partitions (deleted
    afterwards); empty partitions make no run.

    Between runs the heap is unfrozen and collected: the sink freezes it at setup (gc.freeze,
    transforms/sink.py), which would otherwise keep the previous run's garbage cycles for ever
    (measured: 5–7 % more peak RSS over 4 or 10 runs sending 200,000 events).
    """
    paths = input_paths(settings.source)
    with tempfile.TemporaryDirectory(prefix="walkeros-klaviyo-partitions-") as directory:
        partitioner = Partitioner(without_api_key(config), count, now_ms=time.time() * 1000)
        partitions = split_input(paths, partitioner, Path(directory))

        def runs() -> Iterator[Run]:
            for index, partition in enumerate(partitions, 1):
                yield Run(index, len(partitions), partition.lines, partition_settings(
                    settings, partition.path, index, len(partitions)))
                os.remove(partition.path)
                gc.unfreeze()
                gc.collect()
        yield runs()
