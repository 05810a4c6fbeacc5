"""Stage `sink`: batched, rate-limited delivery to Klaviyo through the official SDK.

    calls → key by lane and shard → batch in Beam state → send → (delivered | dead letters)

- **Lanes.** Events and profile upserts batch separately, so an identify-only (silent) event's
  upsert never waits behind a full event batch.
- **Shards.** The key is `lane/shard` with `shard = hash(profile key) % sink_shards`, like the
  `parallelism` of Google's HTTP-sink templates: work for one key is serial, so at most
  `2 × sink_shards` requests are in flight however many workers run, and one profile's calls
  stay in order.
- **Batches** hold at most `batch_max_events` calls and wait at most `batch_max_delay_ms` (a
  processing-time timer); an event-time timer at the end of the window flushes what is left when
  a bounded run ends or a streaming job is drained (beam.md §1.4: processing-time timers alone
  are dropped at the end of input). The batch is sent from the flush itself, so a retried bundle
  re-sends the same batch, which Klaviyo dedupes by `unique_id` and upserts by identifiers.
- **Delivery** is transforms/klaviyo/sender.py: per-endpoint rate limits shared by the threads
  of a worker process, retries with backoff and a deadline, a bad entry of a bulk request
  dead-lettered and the rest resent. Many profile upserts at once go as a bulk import job.
  Dead letters are also counted by reason, `dead_letters_sink_<label>` (an HTTP status or a cause
  such as `timeout` or `invalid_request`), to tell a bad mapping from an outage at a glance.
  A refused API key (401, JSON 403) raises: the job stops with a configuration error instead of
  dead-lettering everything.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagRuntimeState,
    BagStateSpec,
    ReadModifyWriteRuntimeState,
    ReadModifyWriteStateSpec,
    RuntimeTimer,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letters import SINK, DeadLetterRecord
from transforms.elements import OutgoingCall
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import DeadLetter, KlaviyoSender
from transforms.klaviyo.wire import CREATE_EVENT
from transforms.metrics import NAMESPACE, counter, dead_letter_reason_counter_name

EVENTS, PROFILES = "events", "profiles"


@dataclass(frozen=True)
class SinkSettings:
    """Everything the sink needs, picklable and free of the API key itself."""

    api_key: ApiKeySource
    base_url: str = ""  # the SDK's test_host: a proxy or a local Klaviyo test server
    batch_max_events: int = 1000
    batch_max_delay_ms: int = 5000
    shards: int = 4
    rate_limit_scale: float = 1.0
    rate_limits: Mapping[Endpoint, Limit] = field(default_factory=dict)
    workers: int = 1  # the rate limits are divided by this (max_num_workers on Dataflow)
    max_retry_seconds: float = 120.0
    profile_bulk_threshold: int = 100  # more upserts than this in one batch: a bulk import job
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0


def shard_key(outgoing: OutgoingCall, shards: int) -> str:
    """`lane/shard`, stable across processes (Python's hash() is salted per process)."""
    lane = EVENTS if outgoing.call.method == CREATE_EVENT else PROFILES
    identity = (outgoing.profile_key or str(outgoing.event_id)).encode("utf-8", "surrogatepass")
    return f"{lane}/{zlib.crc32(identity) % shards}"


class _BeamMetrics:
    """The sender's counts as Beam counters and distributions."""

    def count(self, name: str, value: int = 1) -> None:
        counter(name).inc(value)

    def observe(self, name: str, value: float) -> None:
        beam.metrics.Metrics.distribution(NAMESPACE, name).update(int(value))


_BUFFER = BagStateSpec("buffer", PickleCoder())
_COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
_DELAY = TimerSpec("delay", TimeDomain.REAL_TIME)
_WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)
# The DoFn parameters that hand these to process() and the timer callbacks.
_BUFFER_STATE: Any = beam.DoFn.StateParam(_BUFFER)
_COUNT_STATE: Any = beam.DoFn.StateParam(_COUNT)
_DELAY_TIMER: Any = beam.DoFn.TimerParam(_DELAY)
_WINDOW_END_TIMER: Any = beam.DoFn.TimerParam(_WINDOW_END)
_KEY: Any = beam.DoFn.KeyParam
_WINDOW: Any = beam.DoFn.WindowParam


class _SendBatches(beam.DoFn):
    """Buffers calls per `lane/shard` key in Beam state and sends them in batches."""

    def __init__(self, settings: SinkSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._limiter_handle = shared.Shared()
        self._sender: KlaviyoSender | None = None

    def setup(self) -> None:
        settings = self._settings
        limiter = self._limiter_handle.acquire(lambda: RateLimiter(
            settings.rate_limits, scale=settings.rate_limit_scale, divide_by=settings.workers))
        client = KlaviyoClient(settings.api_key.resolve(), test_host=settings.base_url,
                               connect_timeout=settings.connect_timeout_seconds,
                               read_timeout=settings.read_timeout_seconds)
        self._sender = KlaviyoSender(
            client, limiter, Retrier(RetryPolicy(max_retry_seconds=settings.max_retry_seconds)),
            _BeamMetrics())

    def process(
        self,
        keyed: tuple[str, OutgoingCall],
        window: BoundedWindow = _WINDOW,
        buffer: BagRuntimeState = _BUFFER_STATE,
        count: ReadModifyWriteRuntimeState = _COUNT_STATE,
        delay: RuntimeTimer = _DELAY_TIMER,
        window_end: RuntimeTimer = _WINDOW_END_TIMER,
    ) -> Iterator[DeadLetterRecord]:
        key, outgoing = keyed
        buffer.add(outgoing)
        size = (count.read() or 0) + 1
        if size == 1:
            delay.set(Timestamp.of(self._clock() + self._settings.batch_max_delay_ms / 1000))
            window_end.set(window.max_timestamp())
        if size >= self._settings.batch_max_events:
            delay.clear()
            yield from self._flush(key, buffer, count)
        else:
            count.write(size)

    @on_timer(_DELAY)
    def on_delay(self, key: str = _KEY, buffer: BagRuntimeState = _BUFFER_STATE,
                 count: ReadModifyWriteRuntimeState = _COUNT_STATE
                 ) -> Iterator[DeadLetterRecord]:
        yield from self._flush(key, buffer, count)

    @on_timer(_WINDOW_END)
    def on_window_end(self, key: str = _KEY, buffer: BagRuntimeState = _BUFFER_STATE,
                      count: ReadModifyWriteRuntimeState = _COUNT_STATE
                      ) -> Iterator[DeadLetterRecord]:
        yield from self._flush(key, buffer, count)

    def _flush(self, key: str, buffer: BagRuntimeState, count: ReadModifyWriteRuntimeState
               ) -> Iterator[DeadLetterRecord]:
        batch: list[OutgoingCall] = list(buffer.read())
        buffer.clear()
        count.clear()
        if not batch:
            return
        assert self._sender is not None, "setup() builds the sender"
        lane = key.split("/", 1)[0]
        counter(f"{lane}_batches").inc()
        beam.metrics.Metrics.distribution(NAMESPACE, f"{lane}_batch_size").update(len(batch))
        planned = [(outgoing.call.method, outgoing.call.body) for outgoing in batch]
        if lane == EVENTS:
            outcomes = self._sender.send_events(planned)
        elif len(planned) > self._settings.profile_bulk_threshold:
            outcomes = self._sender.import_profiles(planned)
        else:
            outcomes = [self._sender.send_profile(call) for call in planned]
        now_ms = self._clock() * 1000
        for outgoing, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, DeadLetter):
                counter(dead_letter_reason_counter_name(SINK, outcome.failure.label)).inc()
                yield DeadLetterRecord(SINK, outcome.reason, now_ms, outgoing.envelope,
                                       outgoing.event_id, outgoing.call)
            else:
                counter(f"{lane}_delivered").inc()


class SendToKlaviyo(beam.PTransform):
    """Calls to send → dead letters of the sink stage (all else is delivered)."""

    def __init__(self, settings: SinkSettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._settings = settings
        self._clock = clock

    def expand(self, calls: beam.PCollection) -> beam.PCollection:
        shards = self._settings.shards
        return (calls
                | "shard" >> beam.Map(lambda outgoing: (shard_key(outgoing, shards), outgoing))
                .with_output_types(tuple[str, OutgoingCall])
                | "send" >> beam.ParDo(_SendBatches(self._settings, self._clock)))


def literal_key_problem(settings: SinkSettings, runner: Any) -> str | None:
    """Why a run must not start: a literal key would be stored in a Dataflow job's graph."""
    if settings.api_key.has_literal_only and "Dataflow" in str(runner or ""):
        return ("on Dataflow the API key must come from --klaviyo_api_key_secret (Secret "
                "Manager) or the workers' KLAVIYO_API_KEY; a key in options or in the config "
                "would be stored in the job graph")
    return None
