"""The job's graph, built from its settings:

    read → plan_calls: parse → plan → identify_state → preflight → sink (Klaviyo, or the dry run)
                       └──────────── dead letters of every stage ────────────→ dead_letters

The transform labels are part of the job's identity on Dataflow (an update maps state by them),
so they are fixed strings here and inside each stage.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.pubsub import ReadFromPubSub

from pipeline.local_streaming import LocalReadFromPubSub
from pipeline.options import LOCAL_RUNNERS, LOCAL_STREAMING_RUNNER, JobSettings, OptionsError
from transforms.dead_letters import WriteDeadLetters
from transforms.dry_run import WriteDryRun
from transforms.identify_state import ApplyIdentifyState
from transforms.json_lines import WINDOW_SECONDS
from transforms.klaviyo.api_key import ENV_VAR, ApiKeySource
from transforms.klaviyo.identify_state import DEFAULT_MAX_SKEW_SECONDS
from transforms.parse import Parse
from transforms.parts import Parts
from transforms.plan import Clock, Plan
from transforms.preflight import Preflight
from transforms.read import ReadJsonLines, lift_emulator_receive_limit, pattern_problem
from transforms.sink import SendToKlaviyo, SinkSettings
from transforms.walkeros.config import ConfigError, LoadedConfig, load_config


def read_config(path: str, destination: str | None) -> LoadedConfig:
    """Load the config from a local path or any filesystem Beam knows (gs://)."""
    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    return load_config(text, destination=destination)


class PlanCalls(beam.PTransform):
    """Input records (Pub/Sub messages, bytes or lines) → (outgoing events as parts, dead
    letters): the parts are flattened by the sink (transforms/parts.py)."""

    def __init__(self, config: dict[str, Any], *, ttl_seconds: int,
                 max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS,
                 clock: Clock = time.time) -> None:
        super().__init__()
        self.config = config
        self.ttl_seconds = ttl_seconds
        self.max_skew_seconds = max_skew_seconds
        self.clock = clock

    def expand(self, records: beam.PCollection) -> tuple[Parts, beam.PCollection]:
        events, parse_dead = records | "parse" >> Parse()
        planned, plan_dead = events | "plan" >> Plan(self.config, clock=self.clock)
        calls, state_dead = planned | "identify_state" >> ApplyIdentifyState(
            ttl_seconds=self.ttl_seconds, max_skew_seconds=self.max_skew_seconds,
            clock=self.clock)
        ready, preflight_dead = calls | "preflight" >> Preflight()
        dead = (parse_dead, plan_dead, state_dead, *preflight_dead) | "dead_letters" >> \
            beam.Flatten()
        return ready, dead


def settle_seconds(settings: JobSettings) -> float:
    """How long a local read keeps a message leased after every stage took it: the longest
    it may wait in a sink batch or a windowed file output before it is written."""
    return (settings.sink.batch_max_delay_ms / 1000 + settings.sink.max_retry_seconds
            + WINDOW_SECONDS)


def _read(pipeline: beam.Pipeline, settings: JobSettings, runner: str) -> beam.PCollection:
    """The input: Pub/Sub messages (with attributes), or the non-blank lines of files as bytes.

    A local runner cannot de-duplicate by attribute (BundleBasedDirectRunner raises
    NotImplementedError for `id_label` once the job runs), so `--input_id_attribute` is refused
    here, before anything starts. Local runs against the emulator get the 10 MB pulls the real
    endpoint allows (transforms/read.py), and local streaming reads with `LocalReadFromPubSub`,
    which stops without losing what it pulled (pipeline/local_streaming.py)."""
    if settings.source_kind == "files":
        problem = pattern_problem(settings.source)
        if problem:
            raise OptionsError(problem)
        return pipeline | "read" >> ReadJsonLines(settings.source)
    if runner in LOCAL_RUNNERS:
        if settings.id_attribute:
            raise OptionsError(f"--input_id_attribute needs Dataflow: the local runner {runner} "
                               f"cannot de-duplicate Pub/Sub messages by attribute")
        lift_emulator_receive_limit()
    subscription, topic = ((settings.source, None) if settings.source_kind == "subscription"
                           else (None, settings.source))
    try:
        read = (LocalReadFromPubSub(subscription=subscription, topic=topic,
                                    settle_seconds=settle_seconds(settings))
                if runner == LOCAL_STREAMING_RUNNER else
                ReadFromPubSub(subscription=subscription, topic=topic,
                               id_label=settings.id_attribute, with_attributes=True))
    except ValueError as error:  # a malformed resource name
        raise OptionsError(f"--input_{settings.source_kind} {settings.source}: {error}"
                           ) from None
    return pipeline | "read" >> read


def sink_settings(settings: JobSettings, config: dict[str, Any], runner: str) -> SinkSettings:
    """The sink's settings; on Dataflow only a Secret Manager key (api_key.py)."""
    options_key = settings.sink.api_key
    sink = dataclasses.replace(settings.sink, api_key=ApiKeySource.from_options(
        secret_version=options_key.secret_version, option_key=options_key.literal,
        config_api_key=config.get("settings", {}).get("apiKey")))
    problem = sink.api_key.dataflow_problem(runner)
    if problem:
        raise OptionsError(problem)
    if not sink.api_key.configured(os.environ):
        raise OptionsError(f"no Klaviyo API key: give --klaviyo_api_key_secret, set {ENV_VAR}, "
                           f"or set settings.apiKey in the config (or add --dry_run)")
    return sink


def without_api_key(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the planning stages get it: no key (the sink reads it where it sends)."""
    settings = {k: v for k, v in config.get("settings", {}).items() if k != "apiKey"}
    return {**config, "settings": settings}


def build(pipeline: beam.Pipeline, settings: JobSettings, config: dict[str, Any],
          runner: str = "") -> None:
    """Add the whole job to `pipeline`."""
    calls, dead = _read(pipeline, settings, runner) | "plan_calls" >> PlanCalls(
        without_api_key(config), ttl_seconds=settings.identify_state_ttl_seconds,
        max_skew_seconds=settings.max_clock_skew_seconds)
    if settings.dry_run_output is not None:
        calls | "sink" >> WriteDryRun(settings.dry_run_output, streaming=settings.streaming)
    else:
        sink_dead = calls | "sink" >> SendToKlaviyo(sink_settings(settings, config, runner))
        dead = (dead, sink_dead) | "all_dead_letters" >> beam.Flatten()
    dead | "dead_letters" >> WriteDeadLetters(topic=settings.dead_letter_topic,
                                              path=settings.dead_letter_path,
                                              streaming=settings.streaming)
