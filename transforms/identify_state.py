"""Stage `identify_state`: per profile key, plan a profile upsert only on a real change (D1).

The decision itself is transforms/klaviyo/identify_state.py (the ordering time, the verdicts and
why an unchanged body still travels on as a hint); here it gets Beam keyed state, so that it holds
per user, across workers and restarts. Events whose plan has no identify body do not touch the
state and skip the shuffle. Every planned event leaves as one `OutgoingEvent` with both its calls.

Arrival order is whatever the runner delivers: `decide` is built for that (an event older than
the newest one seen for the key never overwrites newer profile data), and the sink keeps newest
wins for what a later shuffle reorders.

State expiry: a key's state is cleared `ttl` after the newest element timestamp seen for the key
(for Pub/Sub the publish time), by an event-time timer. Event time rather than processing time
because:
- it fires on drain and at the end of a bounded run, so a finished job leaves no state behind,
  and nothing is emitted from the timer, so there is no late timer output for a runner to lose;
- it expires relative to the stream itself: replaying a backlog after an outage keeps the
  state of users whose events are in that backlog;
- it is testable by moving a TestStream's watermark, with no clock to inject; and a
  processing-time timer would also force the local runners off their faster paths (beam.md §1).

Batch runs take no state at all: a key's events are grouped (GroupByKey) and decided one after
another from an empty state. That is what the stateful DoFn does in a bounded run, where the
watermark stays at its start until the input ends, so no expiry fires before the key's last
event. Without state cells the SDK harness's state cache has nothing to weigh: it sizes every
value it caches by walking the object graph and the globals of every loaded module (objsize,
about 0.25 ms per call here, eight calls per key with the two cells there were), which took
55 % of the batch dry run's CPU on FnApiRunner, whose embedded worker always has that cache
(100 MB, not configurable). The cost is Beam's known one: apache/beam#30360 (a regression from
enabling the cache; apache/beam#30362 then made it opt-in, `--max_cache_memory_usage_mb`, for
SDK harness processes such as Dataflow's) and apache/beam#28802 (improving the cache).
The grouped values are the planned events' encoded bytes (elements.encode_planned), decoded by
the decision: FnApiRunner's GroupingBuffer decodes every value it groups and encodes it again
(fn_api_runner/execution.py), so a value typed PlannedEvent was encoded twice and decoded twice
on its way (about 16 µs); bytes pass that buffer untouched, and on Dataflow's shuffle, which
does not decode, the cost is the same either way: one encoding, one decoding.
Streaming keeps the stateful DoFn: state there must outlive bundles and workers. Its one cell
(it was two, `identify_state` and `expires_at`) halves the cache's weighings of a changed key
where the cache is on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders import (
    BytesCoder,
    FloatCoder,
    NullableCoder,
    TimestampCoder,
    TupleCoder,
)
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.coders import PlannedEventCoder  # noqa: F401 - registers the shuffle's coder
from transforms.dead_letters import DEAD_LETTERS, IDENTIFY_STATE, unexpected
from transforms.elements import (
    OutgoingEvent,
    PlannedEvent,
    decode_planned,
    encode_planned,
    outgoing,
)
from transforms.klaviyo.identify_state import (
    DEFAULT_MAX_SKEW_SECONDS,
    IdentifyState,
    Verdict,
    decide,
    ordering_time,
    sink_order,
)
from transforms.metrics import counter
from transforms.parts import Parts

_EVENT_ONLY = "event_only"
# (digest of the last body planned, newest ordering time in ms, when the key expires): explicit
# coders, so that the stored state does not depend on how a Python class pickles (Dataflow
# update compatibility); bytes, a float and a timestamp, which the state cache weighs cheaply.
_STATE_CODER = TupleCoder([NullableCoder(BytesCoder()), NullableCoder(FloatCoder()),
                           NullableCoder(TimestampCoder())])
# Each verdict's counter; an out-of-range upsert is also counted as planned.
_COUNTERS = {Verdict.CHANGED: ("profiles_planned",), Verdict.UNCHANGED: ("profiles_unchanged",),
             Verdict.OLDER: ("profiles_out_of_order",),
             Verdict.OUT_OF_RANGE: ("profiles_planned", "profiles_out_of_range")}


def _event_only(planned: PlannedEvent) -> OutgoingEvent:
    return outgoing(planned, None, planned.plan.timestamp_ms or 0.0)


class _Decide:
    """One planned event against its key's state: the new state and the outgoing event (its
    verdict counted), or a dead letter with the state left as it was."""

    def __init__(self, max_skew_seconds: float, clock: Callable[[], float]) -> None:
        self._max_skew_ms = max_skew_seconds * 1000
        self._clock = clock

    def __call__(self, planned: PlannedEvent, before: IdentifyState
                 ) -> tuple[IdentifyState, OutgoingEvent] | TaggedOutput:
        plan = planned.plan
        assert plan.profile is not None and plan.timestamp_ms is not None
        publish_ms = planned.envelope.publish_time_ms
        reference_ms = publish_ms if publish_ms is not None else self._clock() * 1000
        order_ms = ordering_time(plan.timestamp_ms, reference_ms, self._max_skew_ms)
        sink_ms = sink_order(plan.timestamp_ms, reference_ms, self._max_skew_ms)
        try:
            after, verdict = decide(before, plan.profile.body, order_ms,
                                    timestamp_ms=plan.timestamp_ms)
        except Exception as error:  # noqa: BLE001 - see dead_letters.unexpected
            return unexpected(IDENTIFY_STATE, planned.envelope, error)
        for name in _COUNTERS[verdict]:
            counter(name).inc()
        return after, outgoing(planned, verdict, sink_ms)


class _IdentifyInOrderFn(beam.DoFn):
    """Batch: a key's grouped events decided in turn from an empty state (module docstring)."""

    def __init__(self, max_skew_seconds: float, clock: Callable[[], float]) -> None:
        self._decide = _Decide(max_skew_seconds, clock)

    def process(self, grouped: tuple[str, Iterable[bytes]]
                ) -> Iterator[OutgoingEvent | TaggedOutput]:
        state = IdentifyState()
        for encoded in grouped[1]:
            decided = self._decide(decode_planned(encoded), state)
            if isinstance(decided, TaggedOutput):
                yield decided
            else:
                state, result = decided
                yield result


class _IdentifyStateFn(beam.DoFn):
    """Streaming: one state cell per key, (digest, newest ordering ms, expiry), so that a
    changed key costs one read and one write, and the expiry timer clears one cell."""

    STATE = ReadModifyWriteStateSpec("identify", _STATE_CODER)
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: int, max_skew_seconds: float,
                 clock: Callable[[], float]) -> None:
        self._ttl = Duration(seconds=ttl_seconds)
        self._decide = _Decide(max_skew_seconds, clock)

    # Beam fills the parameters below through marker defaults (TimestampParam, StateParam, …)
    # whose types mypy cannot match with what is passed at run time: they are typed `Any`.
    def process(
        self,
        keyed: tuple[str, PlannedEvent],
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
        state: Any = beam.DoFn.StateParam(STATE),
        expiry: Any = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[OutgoingEvent | TaggedOutput]:
        planned = keyed[1]
        digest, newest_ms, expires_at = state.read() or (None, None, None)
        before = IdentifyState(digest, newest_ms)
        decided = self._decide(planned, before)
        if isinstance(decided, TaggedOutput):
            yield decided
            return
        after, result = decided
        if after != before:
            state.write((after.digest, after.newest_ms,
                         self._extend_expiry(timestamp, window, expires_at, expiry)))
        yield result

    def _extend_expiry(self, timestamp: Timestamp, window: BoundedWindow,
                       expires_at: Timestamp | None, expiry: Any) -> Timestamp:
        """Move the expiry to `ttl` after this element, never earlier (a timer set again
        replaces the old one, and elements can arrive out of order); the expiry now."""
        wanted = min(timestamp + self._ttl, window.max_timestamp())
        if expires_at is None or wanted > expires_at:
            expiry.set(wanted)
            return wanted
        return expires_at

    @on_timer(EXPIRY)
    def expire(self, state: Any = beam.DoFn.StateParam(STATE)) -> None:
        state.clear()


def _key_or_pass(planned: PlannedEvent,
                 encode: Callable[[PlannedEvent], bytes] | None = None
                 ) -> Iterator[tuple[str, PlannedEvent | bytes] | TaggedOutput]:
    """A plan with an identify body, keyed by its profile for the state, as `encode` makes it
    (the batch grouping carries bytes: module docstring); the others pass by: there is nothing
    for the state to decide."""
    if planned.plan.profile is None:
        yield TaggedOutput(_EVENT_ONLY, planned)
    else:
        assert planned.plan.profile_key is not None  # a plan with a profile has a key
        yield state_key(planned.plan.profile_key), \
            planned if encode is None else encode(planned)


def state_key(profile_key: str) -> str:
    """The key of a profile's state: the profile key, unless it holds a lone surrogate (JSON
    may escape one, `"\\ud800"`), which Beam's key coder (strict UTF-8) cannot encode: then
    its JSON text, ASCII, after a NUL that no profile key of that text starts with. Any other
    key stays as it was, so that a job updated in place finds its state."""
    if profile_key.isascii():
        return profile_key
    try:
        profile_key.encode("utf-8")
    except UnicodeEncodeError:
        return "\0" + json.dumps(profile_key)
    return profile_key


class ApplyIdentifyState(beam.PTransform):
    """Planned events → (outgoing events as two parts: decided and direct, dead letters).

    The parts are not flattened here (transforms/parts.py)."""

    def __init__(self, *, ttl_seconds: int,
                 max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.ttl_seconds = ttl_seconds
        self.max_skew_seconds = max_skew_seconds
        self.clock = clock

    def expand(self, planned: beam.PCollection) -> tuple[Parts, beam.PCollection]:
        streaming = planned.pipeline.options.view_as(StandardOptions).streaming
        routed = planned | "route" >> beam.FlatMap(
            _key_or_pass, None if streaming else encode_planned).with_output_types(
            tuple[str, PlannedEvent] if streaming else tuple[str, bytes]).with_outputs(
            _EVENT_ONLY, main="keyed")
        if streaming:
            decide: beam.PTransform = beam.ParDo(_IdentifyStateFn(
                self.ttl_seconds, self.max_skew_seconds, self.clock))
            keyed = routed.keyed
        else:
            decide = beam.ParDo(_IdentifyInOrderFn(self.max_skew_seconds, self.clock))
            keyed = routed.keyed | "group" >> beam.GroupByKey()
        decided = keyed | "decide" >> decide.with_output_types(OutgoingEvent).with_outputs(
            DEAD_LETTERS, main="calls")
        direct = routed[_EVENT_ONLY] | "event_only" >> beam.Map(_event_only).with_output_types(
            OutgoingEvent)
        return (decided.calls, direct), decided[DEAD_LETTERS]
