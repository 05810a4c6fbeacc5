"""The options of the Beam job, and their validation into `JobSettings`.

The options are a `PipelineOptions` subclass, so that Beam's own options (`--runner`,
`--streaming`, `--project`, `--region`, …) pass through unchanged and Dataflow shows ours with
them. Nothing is `required=True`: Beam parses every registered options class whenever options
are built, so one required option would break every other pipeline in the process (beam.md
§4.1). `job_settings` checks them instead and names every problem at once.

`--dry_run` is special: Beam already has a `--dry_run` (TestOptions: the DataflowRunner then
builds the job but never submits it), so ours cannot be registered under that name and must
never reach Beam. `take_dry_run_flag` takes it out of the command line first; it stands for
`--dry_run_output=-` (stdout), and `--dry_run_output` alone also makes a dry run.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.json_lines import STDOUT

DEFAULT_TTL = "30d"
_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
# Runners that execute in this process; `run` waits for them and prints a summary.
LOCAL_RUNNERS = frozenset({"FnApiRunner", "BundleBasedDirectRunner", "DirectRunner",
                           "SwitchingDirectRunner", "PrismRunner"})


class OptionsError(ValueError):
    """Options that cannot make a job; the message says which and why."""


class KlaviyoOptions(PipelineOptions):
    """The job's own options (the README lists them with examples)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input_subscription", default=None,
            help="Pub/Sub subscription to read events from, projects/P/subscriptions/S "
                 "(streaming)")
        parser.add_argument(
            "--input_topic", default=None,
            help="Pub/Sub topic to read events from through a temporary subscription, "
                 "projects/P/topics/T (streaming)")
        parser.add_argument(
            "--input", default=None,
            help="file pattern of JSON Lines events, local or gs:// (batch: local runs, "
                 "backfills)")
        parser.add_argument(
            "--config", default=None,
            help="walkerOS flow.json (v4) or a bare Klaviyo destination config, local or gs://")
        parser.add_argument(
            "--destination", default=None,
            help="destination id in flow.json when it has several Klaviyo destinations")
        parser.add_argument(
            "--dead_letter_topic", default=None,
            help="Pub/Sub topic for dead letters, projects/P/topics/T")
        parser.add_argument(
            "--dead_letter_path", default=None,
            help="file path prefix for dead letters (JSON Lines), local or gs://")
        parser.add_argument(
            "--dry_run_output", default=None,
            help="dry run: write the planned calls here instead of calling Klaviyo; a file "
                 "path prefix (local or gs://) or - for stdout")
        parser.add_argument(
            "--identify_state_ttl", default=DEFAULT_TTL,
            help="forget a user's identify state this long after their newest event: "
                 "seconds, or a number with s, m, h or d (default 30d)")


def help_parser() -> argparse.ArgumentParser:
    """`walkeros-klaviyo run --help`: our options; Beam's pass through."""
    parser = argparse.ArgumentParser(
        prog="walkeros-klaviyo run",
        description="Run the Beam pipeline: walkerOS events → Klaviyo calls. Beam's own "
                    "options (--runner, --streaming, --project, --region, …) pass through; "
                    "without --runner, local runs use FnApiRunner (batch) or "
                    "BundleBasedDirectRunner (streaming).")
    KlaviyoOptions._add_argparse_args(parser)
    parser.add_argument("--dry_run", action="store_true",
                        help="same as --dry_run_output=- (print the planned calls)")
    return parser


def _flag_value(text: str) -> bool:
    lowered = text.lower()
    if lowered not in _TRUE | _FALSE:
        raise OptionsError(f"--dry_run={text}: use true or false")
    return lowered in _TRUE


def take_dry_run_flag(argv: Sequence[str]) -> list[str]:
    """The command line with our `--dry_run[=true|false]` turned into `--dry_run_output`
    (module docstring)."""
    rest: list[str] = []
    dry_run: bool | None = None
    for arg in argv:
        name, has_value, value = arg.partition("=")
        if name == "--dry_run":
            dry_run = _flag_value(value) if has_value else True
        else:
            rest.append(arg)
    has_output = any(arg.partition("=")[0] == "--dry_run_output" for arg in rest)
    if dry_run and not has_output:
        rest.append(f"--dry_run_output={STDOUT}")
    if dry_run is False and has_output:
        raise OptionsError("--dry_run=false contradicts --dry_run_output")
    return rest


def unknown_options(argv: Sequence[str]) -> list[str]:
    """Options no registered options class knows, each with a suggestion when one is close.

    Beam only logs and drops them, which turns a typo such as `--dead_leter_path` into a
    silently different job."""
    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    _, unknown = parser.parse_known_args(list(argv))
    known = [option for action in parser._actions for option in action.option_strings]
    problems = []
    for arg in unknown:
        if not arg.startswith("--"):
            continue
        name = arg.partition("=")[0]
        close = difflib.get_close_matches(name, known, n=1)
        problems.append(f"unknown option {name}" + (f" (did you mean {close[0]}?)" if close
                                                    else ""))
    return problems


def parse_duration(text: str) -> int:
    """`"30d"` → 2592000: seconds, or a whole number with s, m, h or d."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise OptionsError(f"--identify_state_ttl={text}: use a positive duration such as "
                           f"30d, 12h, 90m or 3600")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class JobSettings:
    """The validated options, as the assembly uses them."""

    source_kind: str  # "subscription" | "topic" | "files"
    source: str
    config: str
    destination: str | None
    dead_letter_topic: str | None
    dead_letter_path: str | None
    dry_run_output: str | None  # None: send to Klaviyo
    identify_state_ttl_seconds: int
    streaming: bool


def job_settings(options: PipelineOptions) -> JobSettings:
    """Check the options together; an `OptionsError` lists every problem found."""
    ours = options.view_as(KlaviyoOptions)
    problems = []
    ttl = 0
    sources = [(kind, value) for kind, value in (("subscription", ours.input_subscription),
                                                 ("topic", ours.input_topic),
                                                 ("files", ours.input)) if value]
    if len(sources) != 1:
        problems.append("give exactly one input: --input_subscription, --input_topic or --input")
    if ours.input and options.view_as(StandardOptions).streaming:
        problems.append("--input reads files as a batch job: drop --streaming, or read Pub/Sub "
                        "with --input_subscription or --input_topic")
    if not ours.config:
        problems.append("--config is required (a flow.json or a destination config)")
    if not ours.dead_letter_topic and not ours.dead_letter_path:
        problems.append("dead letters need --dead_letter_topic or --dead_letter_path")
    if ours.dry_run_output is None:
        problems.append("sending to Klaviyo is not part of this build yet: add --dry_run "
                        "(or --dry_run_output=PATH) to write the planned calls instead")
    try:
        ttl = parse_duration(ours.identify_state_ttl)
    except OptionsError as error:
        problems.append(str(error))
    if problems:
        raise OptionsError("; ".join(problems))
    kind, source = sources[0]
    return JobSettings(
        source_kind=kind, source=source, config=ours.config, destination=ours.destination,
        dead_letter_topic=ours.dead_letter_topic, dead_letter_path=ours.dead_letter_path,
        dry_run_output=ours.dry_run_output, identify_state_ttl_seconds=ttl,
        streaming=kind != "files")


def pin_local_runner(options: PipelineOptions, *, streaming: bool) -> str:
    """The runner to use; without `--runner`, a pure-Python one that works offline.

    Beam's default DirectRunner first tries to download Prism (beam.md §1): FnApiRunner is the
    fast batch engine; BundleBasedDirectRunner is the one that runs Pub/Sub and streaming.
    """
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if standard.runner is None:
        standard.runner = "BundleBasedDirectRunner" if streaming else "FnApiRunner"
    return str(standard.runner)
