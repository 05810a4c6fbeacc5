"""Stage `sink`: planned events → Klaviyo, newest profile first, in bounded flushes.

    outgoing events → key `shard/N` → buffer in Beam state → flush: upserts, then events
      → (delivered | dead letters), what is not settled stays in state for the next flush

- **One key per profile's calls.** `N = crc32(profile key, else event id) % sink_shards`: a
  profile's upserts and its events share a key, so a flush can send the upsert before the event
  that planned it (port.md §1), keep only the newest upsert per profile and remember what Klaviyo
  accepted (transforms/klaviyo/flush.py has every rule; this module only carries them out).
- **Pacing.** Each key has its own rate limiter at `limit / sink_shards` per endpoint family.
  A key is processed serially wherever the runner puts it, so all keys together stay within the
  account's limits on any number of workers, and reach them when every key has work.
- **Bounded flushes (streaming).** A flush starts when `batch_max_events` events wait, when
  `batch_max_delay_ms` has passed (a processing-time timer), or at the end of the window (drain).
  It sends for at most `flush_budget_seconds`; what is not settled by then (rate limit, retries,
  a running bulk import job, events waiting for their upsert) stays in state with its first
  attempt time and the timer is re-armed, so no key blocks for minutes. A call still unsettled
  `max_retry_seconds` after its first attempt, across flushes, is a dead letter with its last
  error. Time spent waiting (rate limiter and back-off) is counted in Beam's
  `cumulativeThrottlingSeconds`, which Dataflow's autoscaler reads.
- **Batch runs** flush only at the end of the window, so each profile's final body is the one
  sent (one upsert per profile). FnApiRunner runs a stateful stage's keys one after another in
  one bundle, so there the window-end flushes go to a thread pool, one thread per key, and
  `finish_bundle` emits their dead letters: shards send concurrently as on a real cluster.
  They start together, in `finish_bundle`, once every key's state is taken: a flush started
  from its own timer competed for the interpreter lock with the bundle thread still reading
  the next keys' buffers, and the last keys started up to 0.4 s after the first.
- **State is cheap to hold**: the buffer, the carried-over work and the profile memory are
  bytes with explicit coders (elements.py, flush.py), nothing pickled by class path.
- **Constant cost per element (streaming).** An SDK harness with a state cache
  (`--max_cache_memory_usage_mb`; off by default since apache/beam#30362, for the regression
  of apache/beam#30360) re-weighs a cached bag on every commit that extends it, walking each
  of its items (objsize; apache/beam#28802).
  With one element per bundle and one item per element, that grew with the buffer. So every
  `COMPACT_EVERY` elements a streaming key's buffer is rewritten as one item of length-framed
  calls: the bag never holds more than `COMPACT_EVERY` + 1 items, and each element costs the
  same at 1 or 1,000 buffered calls (bench/sink_element_cost.py). Batch runs add a whole
  bundle's elements in one commit and never compact.
- **Dead letters** carry the original envelope and the failed call (an upsert included), so
  `replay` repairs a profile; they are also counted by reason, `dead_letters_sink_<label>`.
  A refused API key raises: the job stops instead of dead-lettering everything.
"""

from __future__ import annotations

import gc
import hashlib
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.options.pipeline_options import StandardOptions
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
from apache_beam.transforms.window import BoundedWindow, GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.coders import OutgoingEventCoder  # noqa: F401 - registers the sink's coder
from transforms.collector import cyclic_gc_paused
from transforms.dead_letters import SINK, DeadLetterRecord
from transforms.elements import (
    OutgoingEvent,
    decode_outgoing,
    dumps,
    encode_outgoing,
    loads,
    outgoing_of,
    outgoing_row,
)
from transforms.klaviyo.api_key import ApiKeySource
from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.errors import CallFailure, ErrorKind
from transforms.klaviyo.flush import (
    ProfileMemory,
    Upsert,
    past_retry_deadline,
    plan_upserts,
    ready_events,
    split_for_import,
)
from transforms.klaviyo.plan import Call
from transforms.klaviyo.rate_limit import Endpoint, Limit, RateLimiter
from transforms.klaviyo.retry import Retrier, RetryPolicy
from transforms.klaviyo.sender import (
    DeadLetter,
    Delivered,
    ImportJob,
    KlaviyoSender,
    Outcome,
    Pending,
    expired,
)
from transforms.metrics import NAMESPACE, counter, dead_letter_reason_counter_name
from transforms.parts import Parts, as_parts, flatten, label

COMPACT_EVERY = 64  # buffered calls after which a streaming buffer becomes one bag item
RETRY_SECONDS = 1.0  # how soon a flush that left work unsettled runs again (streaming)
ACCEPTED_MEMORY_SECONDS = 3600.0  # how long a key remembers the newest upsert Klaviyo accepted
THROTTLING = "cumulativeThrottlingSeconds"


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
    max_retry_seconds: float = 120.0
    flush_budget_seconds: float = 10.0
    profile_bulk_threshold: int = 100  # more upserts than this in one flush: a bulk import job
    failed_memory_seconds: float = 30 * 86_400.0  # as long as the identify state lasts
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0


def shard_key(outgoing: OutgoingEvent, shards: int) -> str:
    """`shard/N`, stable across processes (Python's hash() is salted per process)."""
    identity = (outgoing.profile_key or str(outgoing.event_id)).encode("utf-8", "surrogatepass")
    return f"shard/{zlib.crc32(identity) % shards}"


# --- the work a key carries between flushes ---------------------------------------------------


@dataclass
class Task:
    """One planned event at the sink until both its calls are settled. `profile`/`event` are
    None once settled; `*_first_s` is the first attempt (wall clock: it must survive a move to
    another worker), `*_failure` the last transient failure as [label, summary, status], `job`
    the import job carrying the upsert."""

    outgoing: OutgoingEvent
    profile: Call | None
    event: Call | None
    profile_first_s: float | None = None
    profile_failure: list[Any] | None = None
    event_first_s: float | None = None
    event_failure: list[Any] | None = None
    job: str | None = None

    @classmethod
    def of(cls, outgoing: OutgoingEvent) -> Task:
        return cls(outgoing, outgoing.profile, outgoing.event)

    @property
    def key(self) -> str | None:
        return self.outgoing.profile_key


@dataclass
class Work:
    """A key's unsettled tasks and running import jobs (job, profile keys in job order)."""

    tasks: list[Task] = field(default_factory=list)
    jobs: list[tuple[ImportJob, list[str]]] = field(default_factory=list)

    def encode(self) -> bytes:
        rows = [[outgoing_row(t.outgoing), t.profile is not None, t.event is not None,
                 t.profile_first_s, t.profile_failure, t.event_first_s, t.event_failure, t.job]
                for t in self.tasks]
        header = dumps([rows, [[job.to_json(), keys] for job, keys in self.jobs]])
        payloads = b"".join(len(t.outgoing.envelope.payload).to_bytes(4, "big") +
                            t.outgoing.envelope.payload for t in self.tasks)
        return len(header).to_bytes(4, "big") + header + payloads

    @classmethod
    def decode(cls, data: bytes | None) -> Work:
        if not data:
            return cls()
        size = int.from_bytes(data[:4], "big")
        rows, jobs = loads(data[4:4 + size])
        offset = 4 + size
        tasks = []
        for row, has_profile, has_event, *rest in rows:
            length = int.from_bytes(data[offset:offset + 4], "big")
            outgoing = outgoing_of(row, data[offset + 4:offset + 4 + length])
            offset += 4 + length
            tasks.append(Task(outgoing, outgoing.profile if has_profile else None,
                              outgoing.event if has_event else None, *rest))
        return cls(tasks, [(ImportJob.from_json(job), keys) for job, keys in jobs])


# --- counts gathered off the bundle thread ------------------------------------------------------


class Tally:
    """The sender's metrics callback and the flush's counts, kept until the bundle's thread
    reports them (Beam metrics count only on that thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.observed: list[tuple[str, float]] = []
        self.gauges: dict[str, float] = {}
        self.throttled_seconds = 0.0

    def count(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counts[name] += value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.observed.append((name, value))

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def throttled(self, seconds: float) -> None:
        with self._lock:
            self.throttled_seconds += seconds

    def report(self) -> None:
        """Into Beam metrics, on the bundle's thread; whole throttled seconds (the rest stays)."""
        with self._lock:
            for name, count in self.counts.items():
                counter(name).inc(count)
            for name, value in self.observed:
                beam.metrics.Metrics.distribution(NAMESPACE, name).update(int(value))
            for name, level in self.gauges.items():
                beam.metrics.Metrics.gauge(NAMESPACE, name).set(int(level))
            whole = int(self.throttled_seconds)
            if whole:
                counter(THROTTLING).inc(whole)
            self.throttled_seconds -= whole
            self.counts.clear()
            self.observed.clear()
            self.gauges.clear()


# --- one flush --------------------------------------------------------------------------------


class Flush:
    """Carries out one flush of one key (module docstring); no Beam, so tests drive it with a
    fake clock. `now` is the wall clock (first attempts), `monotonic` the sender's clock."""

    def __init__(self, sender: KlaviyoSender, settings: SinkSettings, tally: Tally, *,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 planned: Callable[[], object] | None = None) -> None:
        self._sender = sender
        self._planned = planned  # called once a send of events is planned (the sender's hook)
        self._settings = settings
        self._tally = tally
        self._now = now
        self._monotonic = monotonic
        self.dead: list[DeadLetterRecord] = []
        self.settled = 0  # calls settled so far: delivered, dead or not needed

    def run(self, work: Work, memory: ProfileMemory, *, final: bool = False) -> Work:
        """One budgeted pass; the work left for the next flush. `final`: the last flush of a
        window, where events wait until every upsert of the key is settled and then go in as
        few requests as possible (nobody waits for them sooner)."""
        deadline = self._monotonic() + self._settings.flush_budget_seconds
        self._tally.count("sink_flushes")
        jobs = self._poll_jobs(work, memory, deadline)
        busy = {key for _, keys in jobs for key in keys}
        self._send_upserts(work.tasks, memory, busy, deadline, jobs)
        if not final or not any(t.profile is not None for t in work.tasks):
            self._send_events(work.tasks, deadline)
        memory.prune(self._now(), accepted_horizon_s=ACCEPTED_MEMORY_SECONDS,
                     failed_horizon_s=self._settings.failed_memory_seconds)
        return Work([t for t in work.tasks if t.profile is not None or t.event is not None],
                    jobs)

    def run_to_end(self, work: Work, memory: ProfileMemory,
                   sleep: Callable[[float], None] = time.sleep) -> None:
        """Flush until nothing is left (the end of the window: no timer can come after it).
        Every call ends: delivered, or dead at its retry deadline."""
        while work.tasks or work.jobs:
            before = self.settled
            work = self.run(work, memory, final=True)
            if (work.tasks or work.jobs) and self.settled == before:
                sleep(RETRY_SECONDS)  # nothing settled: a job still running, or a pause

    # -- upserts

    def _poll_jobs(self, work: Work, memory: ProfileMemory, deadline: float
                   ) -> list[tuple[ImportJob, list[str]]]:
        running = []
        for job, keys in work.jobs:
            tasks = {t.key: t for t in work.tasks if t.job == job.job_id}
            calls = [_planned(tasks[key].profile) for key in keys]
            outcomes = self._sender.poll_profile_import(job, calls, deadline=deadline)
            if outcomes is None:
                if all(self._expired(tasks[key].profile_first_s) for key in keys):
                    for key in keys:
                        self._upsert_dead(tasks[key], memory, expired(Pending(_failure(
                            tasks[key].profile_failure) or _job_timeout(job))))
                else:
                    running.append((job, keys))
                continue
            still = []
            for key, outcome in zip(keys, outcomes, strict=True):
                if self._settle_upsert(tasks[key], outcome, memory):
                    tasks[key].job = None
                else:
                    still.append(key)
            if still:
                running.append((job, still))
        return running

    def _send_upserts(self, tasks: list[Task], memory: ProfileMemory, busy: set[str],
                      deadline: float, jobs: list[tuple[ImportJob, list[str]]]) -> None:
        waiting = [t for t in tasks if t.profile is not None and t.job is None]
        plan = plan_upserts([Upsert(str(t.key), t.outgoing.order_ms, t.outgoing.profile_changed)
                             for t in waiting], memory, busy)
        for index, why in plan.settle.items():
            waiting[index].profile = None
            self._tally.count(f"profiles_{why}")
            self.settled += 1
        chosen = [waiting[index] for index in plan.send]
        bulk, single = split_for_import([_body(t.profile) for t in chosen],
                                        self._settings.profile_bulk_threshold)
        if bulk:
            self._start_import([chosen[index] for index in bulk], memory, deadline, jobs)
        for index in single:
            if self._monotonic() >= deadline:
                return  # the rest waits for the next flush, chosen again then
            task = chosen[index]
            self._first_attempt(task, "profile")
            outcome = self._sender.send_profile(_planned(task.profile),
                                                deadline=self._deadline(task.profile_first_s,
                                                                        deadline))
            self._settle_upsert(task, outcome, memory)

    def _start_import(self, tasks: list[Task], memory: ProfileMemory, deadline: float,
                      jobs: list[tuple[ImportJob, list[str]]]) -> None:
        for task in tasks:
            self._first_attempt(task, "profile")
        started, outcomes = self._sender.start_profile_import(
            [_planned(t.profile) for t in tasks], deadline=deadline)
        for job, indexes in started:
            for index in indexes:
                tasks[index].job = job.job_id
            jobs.append((job, [str(tasks[index].key) for index in indexes]))
            self._tally.count("profile_import_jobs")
        for index, outcome in outcomes.items():
            self._settle_upsert(tasks[index], outcome, memory)

    def _settle_upsert(self, task: Task, outcome: Outcome, memory: ProfileMemory) -> bool:
        """Apply an upsert's outcome; whether it is settled."""
        assert task.profile is not None and task.key is not None
        if isinstance(outcome, Delivered):
            memory.accepted(task.key, task.outgoing.order_ms, self._now())
            self._tally.count("profiles_delivered")
            if not task.outgoing.profile_changed:
                self._tally.count("profiles_repaired")  # a hint sent for a dead-lettered one
            task.profile = None
            self.settled += 1
            return True
        if isinstance(outcome, DeadLetter):
            self._dead(task, task.profile, outcome.reason, outcome.failure)
            memory.dead_lettered(task.key, task.outgoing.order_ms, self._now())
            task.profile = None
            return True
        task.profile_failure = _row(outcome.failure) or task.profile_failure
        if self._expired(task.profile_first_s):
            self._upsert_dead(task, memory, expired(Pending(_failure(task.profile_failure))))
            return True
        return False

    def _upsert_dead(self, task: Task, memory: ProfileMemory, dead: DeadLetter) -> None:
        assert task.profile is not None and task.key is not None
        self._dead(task, task.profile, dead.reason, dead.failure)
        memory.dead_lettered(task.key, task.outgoing.order_ms, self._now())
        task.profile = None
        task.job = None

    # -- events

    def _send_events(self, tasks: list[Task], deadline: float) -> None:
        unsettled = {str(t.key) for t in tasks if t.profile is not None}
        with_event = [t for t in tasks if t.event is not None]
        ready = [with_event[index] for index in
                 ready_events([t.key for t in with_event], unsettled)]
        if not ready or self._monotonic() >= deadline:
            return
        for task in ready:
            self._first_attempt(task, "event")
        soonest = min(float(t.event_first_s or 0.0) for t in ready)
        outcomes = self._sender.send_events([_planned(t.event) for t in ready],
                                            deadline=self._deadline(soonest, deadline),
                                            planned=self._planned)
        for task, outcome in zip(ready, outcomes, strict=True):
            assert task.event is not None
            if isinstance(outcome, Delivered):
                self._tally.count("events_delivered")
                self.settled += 1
                task.event = None
            elif isinstance(outcome, DeadLetter):
                self._dead(task, task.event, outcome.reason, outcome.failure)
                task.event = None
            else:
                task.event_failure = _row(outcome.failure) or task.event_failure
                if self._expired(task.event_first_s):
                    dead = expired(Pending(_failure(task.event_failure)))
                    self._dead(task, task.event, dead.reason, dead.failure)
                    task.event = None

    # -- helpers

    def _first_attempt(self, task: Task, which: str) -> None:
        attribute = f"{which}_first_s"
        if getattr(task, attribute) is None:
            setattr(task, attribute, self._now())

    def _deadline(self, first_attempt_s: float | None, flush_deadline: float) -> float:
        """The sooner of the flush's end and the call's retry deadline, on the sender's clock."""
        if first_attempt_s is None:
            return flush_deadline
        left = first_attempt_s + self._settings.max_retry_seconds - self._now()
        return min(flush_deadline, self._monotonic() + left)

    def _expired(self, first_attempt_s: float | None) -> bool:
        return first_attempt_s is not None and past_retry_deadline(
            first_attempt_s, self._now(), self._settings.max_retry_seconds)

    def _dead(self, task: Task, call: Call, reason: str, failure: CallFailure) -> None:
        self._tally.count(dead_letter_reason_counter_name(SINK, failure.label))
        self.settled += 1
        self.dead.append(DeadLetterRecord(SINK, reason, self._now() * 1000,
                                          task.outgoing.envelope, task.outgoing.event_id, call))


def _planned(call: Call | None) -> tuple[str, dict[str, Any]]:
    assert call is not None
    return call.method, call.body


def _body(call: Call | None) -> dict[str, Any]:
    assert call is not None
    return call.body


def _row(failure: CallFailure | None) -> list[Any] | None:
    """A transient failure as kept in state: what a dead letter needs of it."""
    return None if failure is None else [failure.label, failure.summary, failure.status]


def _failure(row: list[Any] | None) -> CallFailure | None:
    if row is None:
        return None
    label, summary, status = row
    return CallFailure(ErrorKind.TRANSIENT, label, summary, status)


def _job_timeout(job: ImportJob) -> CallFailure:
    return CallFailure(ErrorKind.TRANSIENT, "job_timeout",
                       f"import job {job.job_id} had not finished at the retry deadline")


# --- the DoFn ---------------------------------------------------------------------------------


_BUFFER = BagStateSpec("buffer", BytesCoder())
_COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
_WORK = ReadModifyWriteStateSpec("work", BytesCoder())
_MEMORY = ReadModifyWriteStateSpec("memory", BytesCoder())
_PACING = ReadModifyWriteStateSpec("pacing", BytesCoder())  # the key's RateLimiter.snapshot()
_DELAY = TimerSpec("delay", TimeDomain.REAL_TIME)
_WINDOW_END = TimerSpec("window_end", TimeDomain.WATERMARK)
# The DoFn parameters that hand these to process() and the timer callbacks.
_BUFFER_STATE: Any = beam.DoFn.StateParam(_BUFFER)
_COUNT_STATE: Any = beam.DoFn.StateParam(_COUNT)
_WORK_STATE: Any = beam.DoFn.StateParam(_WORK)
_MEMORY_STATE: Any = beam.DoFn.StateParam(_MEMORY)
_PACING_STATE: Any = beam.DoFn.StateParam(_PACING)
_DELAY_TIMER: Any = beam.DoFn.TimerParam(_DELAY)
_WINDOW_END_TIMER: Any = beam.DoFn.TimerParam(_WINDOW_END)
_KEY: Any = beam.DoFn.KeyParam
_WINDOW: Any = beam.DoFn.WindowParam


class _SendFlushes(beam.DoFn):
    """Buffers outgoing events per `shard/N` key in Beam state and flushes them (module
    docstring). Senders are built per key, each with its own share of the rate limits."""

    def __init__(self, settings: SinkSettings, *, streaming: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._streaming = streaming
        self._clock = clock
        self._client: KlaviyoClient | None = None
        self._account = ""
        self._senders: dict[str, tuple[KlaviyoSender, Tally, RateLimiter]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._flushes: list[tuple[Callable[[], list[DeadLetterRecord]], Tally]] = []

    def setup(self) -> None:
        settings = self._settings
        api_key = settings.api_key.resolve()
        # Which account the limiters pace (never the key itself: it is a secret).
        self._account = hashlib.sha256(f"{settings.base_url}\0{api_key}".encode()).hexdigest()
        self._client = KlaviyoClient(api_key, test_host=settings.base_url,
                                     connect_timeout=settings.connect_timeout_seconds,
                                     read_timeout=settings.read_timeout_seconds)
        if not self._streaming:
            self._pool = ThreadPoolExecutor(max_workers=settings.shards,
                                            thread_name_prefix="sink-flush")
        # What the process holds by now lives as long as it does: a full cyclic collection
        # need not walk it again every few requests (each allocates thousands of objects).
        gc.freeze()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _sender(self, key: str, pacing: ReadModifyWriteRuntimeState
                ) -> tuple[KlaviyoSender, Tally, RateLimiter]:
        """The key's sender, its limiter continuing from the key's pacing state: a key's
        recent requests travel with it when the runner moves it to another process. A key
        with no pacing state yet (a batch run writes none) keeps what this process knows of
        it (`_process_limiter`)."""
        if key not in self._senders:
            settings = self._settings
            assert self._client is not None, "setup() builds the client"
            tally = Tally()
            limiter = _process_limiter(settings, self._account, key)
            sender = KlaviyoSender(self._client, limiter, Retrier(RetryPolicy()), tally,
                                   max_events_per_request=settings.batch_max_events)
            self._senders[key] = (sender, tally, limiter)
        sender, tally, limiter = self._senders[key]
        snapshot = pacing.read()
        if snapshot:
            limiter.restore(snapshot)
        return sender, tally, limiter

    def process(
        self,
        keyed: tuple[str, OutgoingEvent],
        window: BoundedWindow = _WINDOW,
        buffer: BagRuntimeState = _BUFFER_STATE,
        count: ReadModifyWriteRuntimeState = _COUNT_STATE,
        work: ReadModifyWriteRuntimeState = _WORK_STATE,
        memory: ReadModifyWriteRuntimeState = _MEMORY_STATE,
        pacing: ReadModifyWriteRuntimeState = _PACING_STATE,
        delay: RuntimeTimer = _DELAY_TIMER,
        window_end: RuntimeTimer = _WINDOW_END_TIMER,
    ) -> Iterator[DeadLetterRecord]:
        key, outgoing = keyed
        buffer.add(_framed(encode_outgoing(outgoing)))
        size = (count.read() or 0) + 1
        count.write(size)
        if self._streaming and size % COMPACT_EVERY == 0:
            framed = b"".join(buffer.read())  # what was buffered, this element included
            buffer.clear()
            buffer.add(framed)
        if size == 1:
            window_end.set(window.max_timestamp())
            if self._streaming:
                delay.set(Timestamp.of(self._clock() + self._settings.batch_max_delay_ms / 1000))
        if self._streaming and size >= self._settings.batch_max_events:
            yield from self._flush(key, buffer, count, work, memory, pacing, delay)

    @on_timer(_DELAY)
    def on_delay(self, key: str = _KEY, buffer: BagRuntimeState = _BUFFER_STATE,
                 count: ReadModifyWriteRuntimeState = _COUNT_STATE,
                 work: ReadModifyWriteRuntimeState = _WORK_STATE,
                 memory: ReadModifyWriteRuntimeState = _MEMORY_STATE,
                 pacing: ReadModifyWriteRuntimeState = _PACING_STATE,
                 delay: RuntimeTimer = _DELAY_TIMER) -> Iterator[DeadLetterRecord]:
        yield from self._flush(key, buffer, count, work, memory, pacing, delay)

    @on_timer(_WINDOW_END)
    def on_window_end(self, key: str = _KEY, buffer: BagRuntimeState = _BUFFER_STATE,
                      count: ReadModifyWriteRuntimeState = _COUNT_STATE,
                      work: ReadModifyWriteRuntimeState = _WORK_STATE,
                      memory: ReadModifyWriteRuntimeState = _MEMORY_STATE,
                      pacing: ReadModifyWriteRuntimeState = _PACING_STATE
                      ) -> Iterator[DeadLetterRecord]:
        taken = self._take(buffer, count, work, memory)
        work.clear()
        memory.clear()
        sender, tally, limiter = self._sender(key, pacing)
        if self._pool is None:
            flush = Flush(sender, self._settings, tally)
            flush.run_to_end(*_decoded(taken))
            pacing.write(limiter.snapshot())
            tally.report()
            yield from flush.dead
            return

        # The end of a batch job: the decoded calls of every key and their planned requests
        # (millions of objects for a large backfill) live until their flush ends, and building
        # them sets off full cyclic collections that walk them all and find nothing (measured:
        # 21 of 0.1-1.5 s in a 172,500-event job, stalling every shard). Frozen once decoded
        # and once planned, they are skipped; refcounting still frees them. (Not in streaming:
        # there a flush holds at most a batch, and frozen cycles would never be collected.)
        flush = Flush(sender, self._settings, tally, planned=gc.freeze)

        def run() -> list[DeadLetterRecord]:
            with cyclic_gc_paused():  # no collection walks them before they are frozen
                decoded = _decoded(taken)
                gc.freeze()
            flush.run_to_end(*decoded)
            return flush.dead
        self._flushes.append((run, tally))

    def finish_bundle(self) -> Iterable[WindowedValue]:
        flushes, self._flushes = self._flushes, []
        if not flushes:
            return
        assert self._pool is not None, "only a batch run's window ends queue flushes"
        running = [(self._pool.submit(run), tally) for run, tally in flushes]
        for future, tally in running:
            dead = future.result()  # a refused key raises here and stops the job
            tally.report()
            for record in dead:
                yield WindowedValue(record, GlobalWindow().max_timestamp(), (GlobalWindow(),))

    def _take(self, buffer: BagRuntimeState, count: ReadModifyWriteRuntimeState,
              work: ReadModifyWriteRuntimeState, memory: ReadModifyWriteRuntimeState
              ) -> tuple[bytes | None, list[bytes], bytes | None]:
        """The key's state as stored (decoded by `_decoded`, possibly on a pool thread)."""
        taken = work.read(), list(buffer.read()), memory.read()
        buffer.clear()
        count.clear()
        return taken

    def _flush(self, key: str, buffer: BagRuntimeState, count: ReadModifyWriteRuntimeState,
               work: ReadModifyWriteRuntimeState, memory: ReadModifyWriteRuntimeState,
               pacing: ReadModifyWriteRuntimeState, delay: RuntimeTimer
               ) -> Iterator[DeadLetterRecord]:
        pending, known = _decoded(self._take(buffer, count, work, memory))
        sender, tally, limiter = self._sender(key, pacing)
        flush = Flush(sender, self._settings, tally)
        left = flush.run(pending, known)
        pacing.write(limiter.snapshot())
        tally.report()
        if left.tasks or left.jobs:
            work.write(left.encode())
            delay.set(Timestamp.of(self._clock() + RETRY_SECONDS))
        else:
            work.clear()
        if len(known):
            memory.write(known.encode())
        else:
            memory.clear()
        yield from flush.dead


_LIMITERS: dict[tuple[Any, ...], RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def _process_limiter(settings: SinkSettings, account: str, key: str) -> RateLimiter:
    """The limiter of `key` for this account in this process, shared by every DoFn instance
    and every run that sends for it here. A split local backfill runs its partitions one
    after another in one process (pipeline/local_backfill.py): each run's keys must continue
    from the requests the run before made, or a run starting inside the minute its
    predecessor used would send a second minute's worth into it (measured: 429s)."""
    identity = (account, key, settings.shards, settings.rate_limit_scale,
                tuple(sorted(settings.rate_limits.items())))
    with _LIMITERS_LOCK:
        if identity not in _LIMITERS:
            _LIMITERS[identity] = RateLimiter(settings.rate_limits,
                                              scale=settings.rate_limit_scale,
                                              share=1 / settings.shards)
        return _LIMITERS[identity]


def _decoded(taken: tuple[bytes | None, list[bytes], bytes | None]
             ) -> tuple[Work, ProfileMemory]:
    """A key's stored state (`_SendFlushes._take`) as the flush works on it."""
    work, buffered, memory = taken
    carried = Work.decode(work)
    carried.tasks += [Task.of(decode_outgoing(raw)) for raw in _unframed(buffered)]
    return carried, ProfileMemory.decode(memory)


def _framed(encoded: bytes) -> bytes:
    """One buffered call as a bag item holds it: its 4-byte length, then its bytes."""
    return len(encoded).to_bytes(4, "big") + encoded


def _unframed(items: Iterable[bytes]) -> Iterator[bytes]:
    """The calls of buffer items, each holding one or more framed calls (compacted)."""
    for item in items:
        offset = 0
        while offset < len(item):
            size = int.from_bytes(item[offset:offset + 4], "big")
            yield item[offset + 4:offset + 4 + size]
            offset += 4 + size


class SendToKlaviyo(beam.PTransform):
    """Outgoing events (one PCollection or parts: transforms/parts.py) → dead letters of the
    sink stage (all else is delivered). The parts are keyed, then flattened."""

    def __init__(self, settings: SinkSettings, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self._settings = settings
        self._clock = clock

    def expand(self, calls: beam.PCollection | Parts) -> beam.PCollection:
        shards = self._settings.shards
        parts = as_parts(calls)
        streaming = bool(parts[0].pipeline.options.view_as(StandardOptions).streaming)
        keyed = flatten(tuple(
            part | label("shard", index) >> beam.Map(
                lambda outgoing: (shard_key(outgoing, shards), outgoing)).with_output_types(
                tuple[str, OutgoingEvent])
            for index, part in enumerate(parts)), "keyed")
        return keyed | "send" >> beam.ParDo(_SendFlushes(self._settings, streaming=streaming,
                                                          clock=self._clock))

