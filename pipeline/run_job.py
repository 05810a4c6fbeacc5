"""`walkeros-klaviyo run` / `python -m pipeline`: check the options, build the job, run it.

Local runs (no `--runner`, or a runner in this process) are waited for; a bounded one ends with
a summary of the counters on stderr (stdout may carry the dry-run output). A local batch run
over a large input is split by profile into runs one after another, with one summary
(pipeline/local_backfill.py). A job for a remote runner such as Dataflow is submitted and not
waited for, as a Flex Template launcher needs.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import Any, TextIO

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipeline import version_line
from pipeline.assembly import build, read_config, sink_settings
from pipeline.local_backfill import partition_count, partitioned
from pipeline.local_streaming import STOP, install_stop_handlers, notify_stderr, settle_leases
from pipeline.options import (
    LOCAL_RUNNERS,
    LOCAL_STREAMING_RUNNER,
    JobSettings,
    OptionsError,
    help_parser,
    job_settings,
    pin_local_runner,
    take_dry_run_flag,
    unknown_options,
)
from transforms.dead_letters import PARSE, PLAN, SINK, STAGES
from transforms.klaviyo.api_key import check_api_key
from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.metrics import COUNTERS, NAMESPACE, dead_letter_counter_name
from transforms.walkeros.config import ConfigError

PROG = "walkeros-klaviyo run"


def counter_totals(result: PipelineResult) -> dict[str, int]:
    """This pipeline's counters, summed over the steps that count under the same name."""
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for metric in query["counters"]:
        value = metric.committed if metric.committed is not None else metric.attempted
        name = metric.key.metric.name
        totals[name] = totals.get(name, 0) + int(value or 0)
    return totals


# Where each input record ended: exactly one of these, so they add up to "events in".
_OUTCOMES = (dead_letter_counter_name(PARSE), dead_letter_counter_name(PLAN), "ignored",
             "consent", "no_identifier", "events_planned", "identify_only", "nothing_to_send")


def print_summary(totals: dict[str, int], out: TextIO) -> None:
    """The counters of a finished run: first where every input record ended (indented rows
    that add up to "events in"), then what the later stages did with the planned ones."""
    labels = dict(COUNTERS) | {dead_letter_counter_name(stage): f"dead letters: {stage}"
                               for stage in STAGES}
    rows = [(labels["events_in"], totals.get("events_in", 0))]
    rows += [(f"  {labels[name]}", totals.get(name, 0)) for name in _OUTCOMES]
    # ("invalid" is left out: every invalid event is already a parse or plan dead letter.)
    later = [name for name, _ in COUNTERS if name not in (*_OUTCOMES, "events_in", "invalid")]
    later += [dead_letter_counter_name(stage) for stage in STAGES
              if dead_letter_counter_name(stage) not in _OUTCOMES]
    rows += [(labels[name], totals.get(name, 0)) for name in later]
    by_reason = dead_letter_counter_name(SINK) + "_"
    rows += [(f"  sink, {name.removeprefix(by_reason)}", value)
             for name, value in sorted(totals.items()) if name.startswith(by_reason)]
    width = max(len(label) for label, _ in rows)
    print("summary", file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>8}", file=out)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        help_parser().print_help()
        return 0
    if "--version" in argv:
        print(version_line())
        return 0
    try:
        argv = take_dry_run_flag(argv)
        unknown = unknown_options(argv)
        if unknown:
            raise OptionsError("; ".join(unknown))
        options = PipelineOptions(argv)
        settings = job_settings(options)
        loaded = read_config(settings.config, settings.destination)
    except OptionsError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"{PROG}: configuration error: {error}", file=sys.stderr)
        return 2
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)

    runner = pin_local_runner(options, streaming=settings.streaming)
    try:
        if settings.dry_run_output is None:  # before anything else touches a service: one request
            sink = sink_settings(settings, loaded.config, runner)
            unchecked = check_api_key(sink.api_key, base_url=sink.base_url)
            if unchecked:
                print(f"{PROG}: warning: {unchecked}", file=sys.stderr)
        partitions = partition_count(settings, runner)
        if partitions > 1:  # a local backfill too big to hold in memory at once
            return _run_partitions(options, settings, loaded.config, runner, partitions)
        pipeline = beam.Pipeline(options=options)
        build(pipeline, settings, loaded.config, runner)
    except (OptionsError, KlaviyoConfigurationError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if runner not in LOCAL_RUNNERS:
        pipeline.run()
        print(f"{PROG}: submitted to {runner}", file=sys.stderr)
        return 0
    _quiet_local_runner_errors()
    if runner == LOCAL_STREAMING_RUNNER:
        install_stop_handlers(STOP, notify_stderr)
    code, totals = _run_locally(pipeline, streaming=settings.streaming)
    if totals is not None:
        print_summary(totals, sys.stderr)
    return code


def _run_partitions(options: PipelineOptions, settings: JobSettings, config: dict[str, Any],
                    runner: str, partitions: int) -> int:
    """A local batch run split by profile into runs one after another (local_backfill.py);
    one summary of them all."""
    _quiet_local_runner_errors()
    print(f"{PROG}: splitting the input by profile into {partitions} runs, one after another",
          file=sys.stderr)
    totals: Counter[str] = Counter()
    with partitioned(settings, config, partitions) as runs:
        for run in runs:
            print(f"{PROG}: run {run.index} of {run.count}: {run.lines} lines", file=sys.stderr)
            pipeline = beam.Pipeline(options=options)
            build(pipeline, run.settings, config, runner)
            code, part = _run_locally(pipeline, streaming=False)
            if part is None or code:
                print(f"{PROG}: stopped at run {run.index} of {run.count}; the runs before it "
                      f"had finished", file=sys.stderr)
                return code or 1
            totals.update(part)
    print_summary(totals, sys.stderr)
    return 0


def _quiet_local_runner_errors() -> None:
    """A failing DoFn makes the local runners log its traceback once per attempt (hundreds of
    lines); `_run_locally` reports the error in one line instead."""
    for name in ("apache_beam.runners.common", "apache_beam.runners.direct.executor"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run_locally(pipeline: beam.Pipeline, *, streaming: bool
                 ) -> tuple[int, dict[str, int] | None]:
    """Run and wait (FnApiRunner runs inside `run`, the direct runner in the background);
    settle what a local streaming read still leases; a failure is one line. The exit code, and
    the counters of a batch run that finished."""
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except KeyboardInterrupt:  # a second SIGINT or SIGTERM: quit now
        released = settle_leases(succeeded=False)
        print(f"{PROG}: stopped at once; {released} pulled message(s) not acknowledged "
              f"will be delivered again by the next run", file=sys.stderr)
        return 130, None
    except Exception as error:  # noqa: BLE001 - the job failed: one line, no traceback
        released = settle_leases(succeeded=False)
        print(f"{PROG}: the job failed: {_first_line(error)}"
              + (f"; {released} pulled message(s) not acknowledged will be delivered again "
                 f"by the next run" if streaming else ""), file=sys.stderr)
        return 1, None
    if streaming:
        acknowledged = settle_leases(succeeded=True)
        print(f"{PROG}: stopped ({STOP.reason or 'input ended'}); everything pulled was "
              f"delivered or dead-lettered ({acknowledged} acknowledged at the end)",
              file=sys.stderr)
    code = 0 if state == PipelineState.DONE else 1
    return code, None if streaming else counter_totals(result)


def _first_line(error: BaseException) -> str:
    """The innermost cause's message, first line: Beam wraps a DoFn's error in its own."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
