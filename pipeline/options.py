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
import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.json_lines import STDOUT
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.identify_state import DEFAULT_MAX_SKEW_SECONDS
from transforms.klaviyo.rate_limit import Endpoint, Limit, max_keys
from transforms.sink import SinkSettings

DEFAULT_TTL = "30d"
_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
# Runners that execute in this process; `run` waits for them and prints a summary.
LOCAL_STREAMING_RUNNER = "BundleBasedDirectRunner"
LOCAL_RUNNERS = frozenset({"FnApiRunner", "BundleBasedDirectRunner", "DirectRunner",
                           "SwitchingDirectRunner", "PrismRunner"})
_DIRECT_RUNNERS = frozenset({"DirectRunner", "SwitchingDirectRunner"})


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
            "--input_id_attribute", default=None,
            help="Pub/Sub attribute that holds a unique id set by the publisher: Dataflow "
                 "drops messages that repeat an id (Beam's id_label); local runners cannot, "
                 "so they refuse it")
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
        parser.add_argument(
            "--max_clock_skew_seconds", type=float, default=DEFAULT_MAX_SKEW_SECONDS,
            help="an event orders its profile's upserts by its timestamp, but never by more "
                 "than this after its publish (or processing) time (default "
                 f"{DEFAULT_MAX_SKEW_SECONDS})")
        # The Klaviyo sink (transforms/sink.py); the API key's precedence is in
        # transforms/klaviyo/api_key.py.
        parser.add_argument(
            "--klaviyo_api_key_secret", default=None,
            help="Secret Manager version holding the Klaviyo private API key, "
                 "projects/P/secrets/S/versions/V (the way to run on Dataflow)")
        parser.add_argument(
            "--klaviyo_api_key", default=None,
            help="the Klaviyo private API key itself, for local runs only (on Dataflow it "
                 "would be stored in the job graph); KLAVIYO_API_KEY in the environment "
                 "takes precedence")
        parser.add_argument(
            "--klaviyo_base_url", default=None,
            help="base URL instead of https://a.klaviyo.com, for proxies and test servers")
        parser.add_argument(
            "--batch_max_events", type=int, default=1000,
            help="events per bulk request at most (1-1000, default 1000)")
        parser.add_argument(
            "--batch_max_delay_ms", type=int, default=5000,
            help="how long a call may wait in a batch before it is sent (default 5000)")
        parser.add_argument(
            "--sink_shards", type=int, default=4,
            help="sink keys (shard/N); each carries its profiles' upserts and events and paces "
                 "itself at 1/N of the account's limits, so N bounds the requests in flight "
                 "(default 4, at most 10 with the published limits)")
        parser.add_argument(
            "--rate_limit_scale", type=float, default=1.0,
            help="multiply all of Klaviyo's published rate limits (raised account limits, or "
                 "test servers whose clock runs faster; default 1)")
        parser.add_argument(
            "--rate_limits", default=None,
            help="per-endpoint limits as burst/s:steady/min, e.g. "
                 "bulk_events=10:150,profile_import=75:700 (endpoints: "
                 f"{', '.join(endpoint.value for endpoint in Endpoint)})")
        parser.add_argument(
            "--max_retry_seconds", type=float, default=120.0,
            help="retry a failing call for at most this long after its first attempt, across "
                 "flushes, then dead-letter it (default 120)")
        parser.add_argument(
            "--flush_budget_seconds", type=float, default=10.0,
            help="a sink flush sends for at most this long; the rest waits in state for the "
                 "next one (default 10)")
        parser.add_argument(
            "--profile_bulk_threshold", type=int, default=100,
            help="a flush with more profile upserts without null than this sends them as one "
                 "bulk import job (default 100)")
        parser.add_argument(
            "--local_partitions", type=int, default=0,
            help="local batch runs over files (FnApiRunner): split the input by profile into "
                 "this many runs, one after another, to bound memory; 1: one run; default 0: "
                 "one run per 100,000 lines (pipeline/local_backfill.py)")


# What `job_settings` requires, as `run --help` marks it (Beam forbids required=True).
REQUIRED_HELP = {
    "config": "[required]",
    "input_subscription": "[required: one input]",
    "input_topic": "[required: one input]",
    "input": "[required: one input]",
    "dead_letter_topic": "[required: one or both]",
    "dead_letter_path": "[required: one or both]",
}


def help_parser() -> argparse.ArgumentParser:
    """`walkeros-klaviyo run --help`: our options, the required ones marked; Beam's pass
    through."""
    parser = argparse.ArgumentParser(
        prog="walkeros-klaviyo run",
        description="Run the Beam pipeline: walkerOS events → Klaviyo calls. Required: "
                    "--config, one input (--input_subscription, --input_topic or --input) "
                    "and --dead_letter_topic and/or --dead_letter_path. Beam's own options "
                    "(--runner, --streaming, --project, --region, …) pass through; without "
                    "--runner, local runs use FnApiRunner (batch) or BundleBasedDirectRunner "
                    "(streaming).")
    KlaviyoOptions._add_argparse_args(parser)
    for action in parser._actions:
        if action.dest in REQUIRED_HELP:
            action.help = f"{REQUIRED_HELP[action.dest]} {action.help}"
    parser.add_argument("--dry_run", action="store_true",
                        help="same as --dry_run_output=- (print the planned calls)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
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


def _raise_options_error(message: str) -> NoReturn:
    raise OptionsError(message)


def unknown_options(argv: Sequence[str]) -> list[str]:
    """What no registered options class understands, each with a suggestion when one is close;
    a value that does not parse (`--batch_max_events=abc`) raises an `OptionsError` with one
    line instead of argparse's usage text.

    Beam only logs and drops unknown arguments, which turns a typo such as `-dry_run` (one
    dash) or `--dead_leter_path` into a silently different job: a dry run into a real send."""
    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    parser = parsers[0]
    parser.error = _raise_options_error  # type: ignore[method-assign]
    _, unknown = parser.parse_known_args(list(argv))
    known = [option for action in parser._actions for option in action.option_strings]
    problems = []
    after_option = False  # a bare word after an unknown `--name` is taken as its value
    for arg in unknown:
        if not arg.startswith("-"):
            if not after_option:
                problems.append(f"unexpected argument {arg!r}")
            after_option = False
            continue
        name, has_value, _ = arg.partition("=")
        after_option = not has_value
        close = difflib.get_close_matches(name if name.startswith("--") else f"-{name}",
                                          known, n=1)
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


def parse_rate_limits(text: str | None) -> dict[Endpoint, Limit]:
    """`bulk_events=10:150,profile_import=75:700` → per-endpoint limits."""
    limits: dict[Endpoint, Limit] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        burst, _, steady = value.partition(":")
        try:
            limits[Endpoint(name.strip())] = Limit(float(burst), float(steady))
        except ValueError:
            raise OptionsError(
                f"--rate_limits: {item.strip()!r} is not ENDPOINT=BURST_PER_S:STEADY_PER_MIN "
                f"with ENDPOINT one of {', '.join(e.value for e in Endpoint)}") from None
    return limits


def _sink_settings(ours: KlaviyoOptions, problems: list[str]) -> SinkSettings:
    if not 1 <= ours.batch_max_events <= 1000:
        problems.append("--batch_max_events must be between 1 and 1000 (Klaviyo's bulk limit)")
    for name in ("batch_max_delay_ms", "sink_shards", "profile_bulk_threshold"):
        if getattr(ours, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if min(ours.rate_limit_scale, ours.max_retry_seconds, ours.flush_budget_seconds) <= 0:
        problems.append("--rate_limit_scale, --max_retry_seconds and --flush_budget_seconds "
                        "must be positive")
    try:
        limits = parse_rate_limits(ours.rate_limits)
    except OptionsError as error:
        problems.append(str(error))
        limits = {}
    if ours.sink_shards > max_keys(limits):
        problems.append(f"--sink_shards must be at most {max_keys(limits)}: each shard key paces "
                        f"itself at its share of Klaviyo's limits and needs at least one request "
                        f"per second of the bulk endpoints' burst limit")
    return SinkSettings(
        # The config's settings.apiKey joins these sources when the config is read (assembly).
        api_key=ApiKeySource(ours.klaviyo_api_key_secret or None, ours.klaviyo_api_key or None),
        base_url=ours.klaviyo_base_url or "", batch_max_events=ours.batch_max_events,
        batch_max_delay_ms=ours.batch_max_delay_ms, shards=ours.sink_shards,
        rate_limit_scale=ours.rate_limit_scale, rate_limits=limits,
        max_retry_seconds=ours.max_retry_seconds, flush_budget_seconds=ours.flush_budget_seconds,
        profile_bulk_threshold=ours.profile_bulk_threshold)


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
    max_clock_skew_seconds: float
    streaming: bool
    sink: SinkSettings  # its API key sources still lack the config's settings.apiKey
    id_attribute: str | None = None  # Pub/Sub de-duplication attribute (Beam's id_label)
    local_partitions: int = 0  # runs a local batch job is split into; 0: from the input size


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
    if ours.input_id_attribute and not (ours.input_subscription or ours.input_topic):
        problems.append("--input_id_attribute is for Pub/Sub input (--input_subscription or "
                        "--input_topic)")
    if not ours.config:
        problems.append("--config is required (a flow.json or a destination config)")
    if not ours.dead_letter_topic and not ours.dead_letter_path:
        problems.append("dead letters need --dead_letter_topic or --dead_letter_path")
    sink = _sink_settings(ours, problems)
    if ours.max_clock_skew_seconds < 0:
        problems.append("--max_clock_skew_seconds must not be negative")
    if ours.local_partitions < 0:
        problems.append("--local_partitions must not be negative (0: from the input size)")
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
        max_clock_skew_seconds=ours.max_clock_skew_seconds, streaming=kind != "files",
        sink=dataclasses.replace(sink, failed_memory_seconds=float(ttl)),
        id_attribute=ours.input_id_attribute or None, local_partitions=ours.local_partitions)


def pin_local_runner(options: PipelineOptions, *, streaming: bool) -> str:
    """The runner to use; without `--runner`, a pure-Python one that works offline.

    Beam's default DirectRunner first tries to download Prism (beam.md §1): FnApiRunner is the
    fast batch engine; BundleBasedDirectRunner is the one that runs Pub/Sub and streaming.
    Beam's DirectRunner runs Pub/Sub on BundleBasedDirectRunner anyway; naming it lets the job
    use its stoppable read (pipeline/local_streaming.py).
    """
    standard = options.view_as(StandardOptions)
    if streaming:
        standard.streaming = True
    if standard.runner is None or (streaming and standard.runner in _DIRECT_RUNNERS):
        standard.runner = LOCAL_STREAMING_RUNNER if streaming else "FnApiRunner"
    return str(standard.runner)
