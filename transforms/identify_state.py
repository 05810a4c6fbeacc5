"""Stage `identify_state`: per profile key, send a profile upsert only on a real change (D1).

The decision itself is transforms/klaviyo/identify_state.py; here it gets Beam keyed state, so
that it holds per user, across workers and restarts. Events whose plan has no identify body do
not touch the state and skip the shuffle.

Arrival order is whatever the runner delivers: `decide` is built for that (an event older than
the newest one seen for the key never overwrites newer profile data).

State expiry: a key's state is cleared `ttl` after the newest element timestamp seen for the key
(for Pub/Sub the publish time), by an event-time timer. Event time rather than processing time
because:
- it fires on drain and at the end of a bounded run, so a finished job leaves no state behind,
  and nothing is emitted from the timer, so there is no late timer output for a runner to lose;
- it expires relative to the stream itself: replaying a backlog after an outage keeps the
  state of users whose events are in that backlog;
- it is testable by moving a TestStream's watermark, with no clock to inject; and a
  processing-time timer would also force the local runners off their faster paths (beam.md §1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.coders import FloatCoder, NullableCoder, StrUtf8Coder, TimestampCoder, TupleCoder
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.dead_letters import DEAD_LETTERS, IDENTIFY_STATE, unexpected
from transforms.elements import OutgoingCall, PlannedEvent
from transforms.klaviyo.identify_state import IdentifyState, decide
from transforms.metrics import counter

_EVENT_ONLY = "event_only"
# (last body sent as canonical JSON, newest event time in ms): explicit coders, so that the
# stored state does not depend on how a Python class pickles (Dataflow update compatibility).
_STATE_CODER = TupleCoder([NullableCoder(StrUtf8Coder()), NullableCoder(FloatCoder())])


def _calls(planned: PlannedEvent, *, send_profile: bool) -> Iterator[OutgoingCall]:
    plan = planned.plan
    for call in plan.calls(send_profile=send_profile):
        yield OutgoingCall(planned.envelope, plan.event_id, plan.profile_key, call)


class _IdentifyStateFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("identify_state", _STATE_CODER)
    EXPIRES_AT = ReadModifyWriteStateSpec("expires_at", TimestampCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, ttl_seconds: int) -> None:
        self._ttl = Duration(seconds=ttl_seconds)

    # Beam fills the parameters below through marker defaults (TimestampParam, StateParam, …)
    # whose types mypy cannot match with what is passed at run time: they are typed `Any`.
    def process(
        self,
        keyed: tuple[str, PlannedEvent],
        timestamp: Any = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
        state: Any = beam.DoFn.StateParam(STATE),
        expires_at: Any = beam.DoFn.StateParam(EXPIRES_AT),
        expiry: Any = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[OutgoingCall | TaggedOutput]:
        planned = keyed[1]
        plan = planned.plan
        assert plan.profile is not None and plan.timestamp_ms is not None
        try:
            stored = state.read()
            before = IdentifyState(*stored) if stored is not None else IdentifyState()
            after, send = decide(before, plan.profile.body, plan.timestamp_ms)
        except Exception as error:  # noqa: BLE001 - see dead_letters.unexpected
            yield unexpected(IDENTIFY_STATE, planned.envelope, error)
            return
        state.write((after.last_body, after.newest_ms))
        if send:
            counter("profiles_planned").inc()
        elif before.newest_ms is not None and plan.timestamp_ms < before.newest_ms:
            counter("profiles_out_of_order").inc()
        else:
            counter("profiles_unchanged").inc()
        self._extend_expiry(timestamp, window, expires_at, expiry)
        yield from _calls(planned, send_profile=send)

    def _extend_expiry(self, timestamp: Timestamp, window: BoundedWindow,
                       expires_at: Any, expiry: Any) -> None:
        """Move the expiry to `ttl` after this element, never earlier (a timer set again
        replaces the old one, and elements can arrive out of order)."""
        wanted = min(timestamp + self._ttl, window.max_timestamp())
        current = expires_at.read()
        if current is None or wanted > current:
            expires_at.write(wanted)
            expiry.set(wanted)

    @on_timer(EXPIRY)
    def expire(
        self,
        state: Any = beam.DoFn.StateParam(STATE),
        expires_at: Any = beam.DoFn.StateParam(EXPIRES_AT),
    ) -> None:
        state.clear()
        expires_at.clear()


def _key_or_pass(planned: PlannedEvent) -> Iterator[tuple[str, PlannedEvent] | TaggedOutput]:
    """A plan with an identify body, keyed by its profile for the state; the others pass by:
    there is nothing for the state to decide."""
    if planned.plan.profile is None:
        yield TaggedOutput(_EVENT_ONLY, planned)
    else:
        assert planned.plan.profile_key is not None  # a plan with a profile has a key
        yield planned.plan.profile_key, planned


class ApplyIdentifyState(beam.PTransform):
    """Planned events → (outgoing calls, dead letters)."""

    def __init__(self, *, ttl_seconds: int) -> None:
        super().__init__()
        self.ttl_seconds = ttl_seconds

    def expand(self, planned: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        routed = planned | "route" >> beam.FlatMap(_key_or_pass).with_output_types(
            tuple[str, Any]).with_outputs(_EVENT_ONLY, main="keyed")
        decided = routed.keyed | "decide" >> beam.ParDo(
            _IdentifyStateFn(self.ttl_seconds)).with_outputs(DEAD_LETTERS, main="calls")
        direct = routed[_EVENT_ONLY] | "event_only" >> beam.FlatMap(_calls, send_profile=False)
        calls = (decided.calls, direct) | "calls" >> beam.Flatten()
        return calls, decided[DEAD_LETTERS]
