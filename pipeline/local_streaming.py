"""Local streaming runs that stop without losing what they pulled (README: Running the pipeline).

Beam's local streaming runner (BundleBasedDirectRunner) reads Pub/Sub with a native evaluator
(`apache_beam/runners/direct/transform_evaluator.py`, `_PubSubReadEvaluator`) that pulls 10
messages, acknowledges them at once, and reads forever: its watermark is the wall clock and it
never finishes. Nothing then makes the job deliver what it holds before the process ends, so
Ctrl-C lost what sat in the sink's batches (42 of 870 measured), and a sink that raised (a
refused key) lost every message pulled while it failed, the whole backlog.

`LocalReadFromPubSub` replaces that read in local runs only (Dataflow keeps `ReadFromPubSub`
and its own acknowledgement after durable commit). Its evaluator:

- pulls only when the rest of the pipeline has no pending bundle, so at most one pull is in
  flight ahead of the sink (back-pressure instead of pulling the whole backlog into memory);
- does not acknowledge at pull time: a message is acknowledged once every stage has taken it
  and a settle time has passed (the sink's batch delay and retry deadline, in `settle_seconds`),
  its ack deadline extended meanwhile by a lease keeper thread;
- on a stop request (`STOP`, set by SIGINT or SIGTERM, see `install_stop_handlers`) stops
  pulling and reports a watermark of +infinity: the window-end timers of the sink flush every
  buffered batch, the runner finishes the job, and `Leases.acknowledge_all` acknowledges what
  is still leased. If the job fails instead (the sink raised), `Leases.release` hands the
  unacknowledged messages back to Pub/Sub at once, to be delivered by the next run.

So a stop loses nothing; a crash or SIGKILL loses only what was acknowledged while the sink
still buffered it (a batch held longer than the settle time), and redelivers the rest.

The runner has no public hook for a source; this registers the evaluator through
`TransformEvaluatorRegistry._test_evaluators_overrides`, the hook Beam's own Pub/Sub tests use
(`apache_beam/io/gcp/pubsub_test.py`), and reads the watermark manager's pending bundles.
Both are internals of apache-beam 2.77 (pinned <2.78 in pyproject.toml); the emulator tests in
tests/test_local_streaming.py fail if they change.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from apache_beam import pvalue
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.runners.direct.direct_runner import _DirectReadFromPubSub
from apache_beam.runners.direct.transform_evaluator import (
    TransformEvaluatorRegistry,
    _PubSubReadEvaluator,
)
from apache_beam.runners.direct.util import TransformResult
from apache_beam.runners.direct.watermark_manager import WatermarkManager
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp

PULL_MAX_MESSAGES = 500
PULL_TIMEOUT_S = 1.0  # the runner has one worker thread: a long pull delays every timer
LEASE_SECONDS = 60  # ack deadline given to leased messages, renewed before it ends
RENEW_EVERY_S = 20.0
IDLE_SLEEP_S = 0.01  # between checks while the pipeline still works on the last pull


class StopRequest:
    """A request to stop pulling and finish the job (set from a signal handler)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


STOP = StopRequest()


def install_stop_handlers(stop: StopRequest, notify: Callable[[str], None]) -> None:
    """SIGINT and SIGTERM ask `stop` to finish the job; a second one quits at once.

    Installed explicitly, also when SIGINT is ignored (a background job of a shell script
    inherits SIG_IGN for it, and Python then installs no KeyboardInterrupt handler)."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise KeyboardInterrupt(name)
        stop.request(name)
        notify(f"{name}: stopping: no more pulls; delivering or dead-lettering what was "
               f"pulled, then exiting ({name} again quits at once)")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


@dataclass
class _Lease:
    ack_ids: list[str]
    settles_at: float | None = None  # set once every stage has taken the messages


@dataclass
class Leases:
    """Pulled messages not yet acknowledged, oldest first, kept leased by a thread."""

    client: Any
    subscription: str
    clock: Callable[[], float] = time.monotonic
    pending: list[_Lease] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _keeper: threading.Thread | None = None
    _closed: threading.Event = field(default_factory=threading.Event)

    def add(self, ack_ids: list[str]) -> None:
        with self._lock:
            self.pending.append(_Lease(ack_ids))
        self._extend(ack_ids)
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="pubsub-leases",
                                            daemon=True)
            self._keeper.start()

    def taken(self, settle_seconds: float) -> None:
        """Every stage has taken what was pulled so far: it may be acknowledged after the
        settle time (the sink may still hold it in a batch until then)."""
        now = self.clock()
        with self._lock:
            for lease in self.pending:
                if lease.settles_at is None:
                    lease.settles_at = now + settle_seconds

    def acknowledge_settled(self) -> None:
        now = self.clock()
        with self._lock:
            settled = [lease for lease in self.pending
                       if lease.settles_at is not None and lease.settles_at <= now]
            self.pending = [lease for lease in self.pending if lease not in settled]
        self._acknowledge([ack_id for lease in settled for ack_id in lease.ack_ids])

    def outstanding(self) -> int:
        with self._lock:
            return sum(len(lease.ack_ids) for lease in self.pending)

    def acknowledge_all(self) -> int:
        """The job finished: everything pulled was delivered or dead-lettered."""
        ack_ids = self._take_all()
        self._acknowledge(ack_ids)
        return len(ack_ids)

    def release(self) -> int:
        """The job failed: hand what was not acknowledged back to Pub/Sub now."""
        ack_ids = self._take_all()
        for start in range(0, len(ack_ids), 1000):
            self.client.modify_ack_deadline(subscription=self.subscription,
                                            ack_ids=ack_ids[start:start + 1000],
                                            ack_deadline_seconds=0)
        return len(ack_ids)

    def _take_all(self) -> list[str]:
        self._closed.set()
        with self._lock:
            ack_ids = [ack_id for lease in self.pending for ack_id in lease.ack_ids]
            self.pending = []
        return ack_ids

    def _acknowledge(self, ack_ids: list[str]) -> None:
        for start in range(0, len(ack_ids), 1000):
            self.client.acknowledge(subscription=self.subscription,
                                    ack_ids=ack_ids[start:start + 1000])

    def _extend(self, ack_ids: list[str]) -> None:
        for start in range(0, len(ack_ids), 1000):
            self.client.modify_ack_deadline(subscription=self.subscription,
                                            ack_ids=ack_ids[start:start + 1000],
                                            ack_deadline_seconds=LEASE_SECONDS)

    def _keep(self) -> None:
        while not self._closed.wait(RENEW_EVERY_S):
            with self._lock:
                ack_ids = [ack_id for lease in self.pending for ack_id in lease.ack_ids]
            try:
                self._extend(ack_ids)
            except Exception:  # noqa: BLE001 - a lost lease means a redelivery, not a loss
                continue


# Leases of the local reads of this process, for `run` to settle when the job ends.
LEASES: list[Leases] = []


def settle_leases(*, succeeded: bool) -> int:
    """Acknowledge (the job finished) or release (it failed) what every read still leases."""
    total = 0
    for leases in LEASES:
        total += leases.acknowledge_all() if succeeded else leases.release()
    return total


class LocalReadFromPubSub(_DirectReadFromPubSub):
    """`ReadFromPubSub(..., with_attributes=True)` for local streaming runs (module docstring)."""

    def __init__(self, *, subscription: str | None = None, topic: str | None = None,
                 settle_seconds: float, stop: StopRequest = STOP) -> None:
        super().__init__(ReadFromPubSub(subscription=subscription, topic=topic,
                                        with_attributes=True)._source)
        self.settle_seconds = settle_seconds
        self.stop = stop
        self.leases: Leases | None = None


def _pipeline_busy(evaluator: _PubSubReadEvaluator) -> bool:
    """Whether any stage but the read still has bundles to process."""
    manager = evaluator._evaluation_context._watermark_manager
    own = evaluator._applied_ptransform
    return any(watermarks._pending for transform, watermarks in
               manager._transform_to_watermarks.items() if transform is not own)


class _StoppableReadEvaluator(_PubSubReadEvaluator):
    """One bundle of `LocalReadFromPubSub`: acknowledge what settled, then pull or stop."""

    def finish_bundle(self) -> TransformResult:
        transform = self._applied_ptransform.transform
        assert isinstance(transform, LocalReadFromPubSub)
        client = self._get_subscriber_client(self._applied_ptransform)
        if transform.leases is None:
            transform.leases = Leases(client, self._sub_name)
            LEASES.append(transform.leases)
        leases = transform.leases
        busy = _pipeline_busy(self)
        if not busy:
            leases.taken(transform.settle_seconds)
        leases.acknowledge_settled()
        if transform.stop.is_set():
            return self._result([], finished=True)
        if busy:
            time.sleep(IDLE_SLEEP_S)
            return self._result([], finished=False)
        return self._result(self._pull(client, leases), finished=False)

    def _pull(self, client: Any, leases: Leases) -> list[Any]:
        from google.api_core import exceptions

        try:
            response = client.pull(subscription=self._sub_name,
                                   max_messages=PULL_MAX_MESSAGES, timeout=PULL_TIMEOUT_S,
                                   retry=None)
        except (exceptions.DeadlineExceeded, exceptions.ServiceUnavailable):
            return []
        if response.received_messages:
            leases.add([received.ack_id for received in response.received_messages])
        return list(response.received_messages)

    def _result(self, received: list[Any], *, finished: bool) -> TransformResult:
        bundles = []
        if received:
            bundle = self._evaluation_context.create_bundle(list(self._outputs)[0])
            for message in received:
                bundle.output(GlobalWindows.windowed_value(
                    PubsubMessage._from_message(message.message),
                    timestamp=Timestamp.from_utc_datetime(message.message.publish_time)))
            bundles.append(bundle)
        if finished:
            return TransformResult(self, bundles, [], None,
                                   {None: WatermarkManager.WATERMARK_POS_INF})
        # The read is a root: an empty bundle of its input schedules it again.
        again = self._evaluation_context.create_bundle(
            pvalue.PBegin(self._applied_ptransform.transform.pipeline))  # type: ignore[union-attr,arg-type]
        return TransformResult(self, bundles, [again], None, {None: Timestamp.of(time.time())})


TransformEvaluatorRegistry._test_evaluators_overrides[LocalReadFromPubSub] = (
    _StoppableReadEvaluator)


def notify_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
