"""`walkeros-klaviyo run` / `python -m pipeline`: check the options, build the job, run it.

Local runs (no `--runner`, or a runner in this process) are waited for; a bounded one ends with
a summary of the counters on stderr (stdout may carry the dry-run output). A job for a remote
runner such as Dataflow is submitted and not waited for, as a Flex Template launcher needs.
"""

from __future__ import annotations

import sys
from typing import TextIO

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipeline.assembly import build, read_config, sink_settings
from pipeline.options import (
    LOCAL_RUNNERS,
    OptionsError,
    help_parser,
    job_settings,
    pin_local_runner,
    take_dry_run_flag,
    unknown_options,
)
from transforms.dead_letters import SINK, STAGES
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


def print_summary(totals: dict[str, int], out: TextIO) -> None:
    rows = [(label, totals.get(name, 0)) for name, label in COUNTERS]
    rows += [(f"dead letters: {stage}", totals.get(dead_letter_counter_name(stage), 0))
             for stage in STAGES]
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
        pipeline = beam.Pipeline(options=options)
        build(pipeline, settings, loaded.config, runner)
    except (OptionsError, KlaviyoConfigurationError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    result = pipeline.run()
    if runner not in LOCAL_RUNNERS:
        print(f"{PROG}: submitted to {runner}", file=sys.stderr)
        return 0
    try:
        state = result.wait_until_finish()
    except KeyboardInterrupt:  # the way to end a local streaming run
        print(f"{PROG}: stopped", file=sys.stderr)
        return 130
    if not settings.streaming:
        print_summary(counter_totals(result), sys.stderr)
    return 0 if state == PipelineState.DONE else 1
