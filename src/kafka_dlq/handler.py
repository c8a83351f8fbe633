"""``DLQHandler``: consumes dead-letter topics, retries with backoff from a durable Redis schedule, parks poison.

Every dead letter that enters leaves by exactly one door: recovered, parked (in the poison topic, with a reason),
or still pending in the schedule. Its DLQ offset is marked done only once that outcome is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any, cast

from kafka_dlq.breaker import BreakerSettings, CircuitBreaker, Permit
from kafka_dlq.classify import Classifier, Decision, qualified_name
from kafka_dlq.errors import ConfigError, KafkaDLQError, RecordTooLargeError
from kafka_dlq.formats import MAX_MESSAGE_BYTES, MAX_STACKTRACE_BYTES, Undecodable, decode, encode_native
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, KafkaRecord
from kafka_dlq.loop_lag import LoopLagProbe
from kafka_dlq.metrics import HandlerMetrics
from kafka_dlq.outcomes import Outcome, ParkNow, Reason
from kafka_dlq.policy import RetryPolicy, TopicPolicies
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure
from kafka_dlq.schedule import Claimed, Entry, RedisSchedule
from kafka_dlq.slices import Slices
from kafka_dlq.tracebacks import SourceReader, format_traceback

__all__ = ["DLQHandler", "KeyFormat", "Mode", "Processor"]

log = logging.getLogger("kafka_dlq.handler")

Processor = Callable[[DeadLetter], Awaitable[None] | None]
"""Recovers one dead letter: returns normally when it worked, raises when it did not (``RetryLater`` and
``ParkNow`` say what to do next). Async processors run on the loop; sync ones in a thread."""


@dataclass(slots=True)
class _BatchProgress:
    """What intake already made durable of one consumed batch, kept across its retries."""

    done: set[int] = field(default_factory=set)
    """Indexes of the records whose outcome is durable (and counted)."""
    repeats: dict[int, int] = field(default_factory=dict)
    """Repeat-offender counts already taken from Redis, by index."""


class Mode(Enum):
    PROCESS = "process"
    """Call the processor registered for the record's original topic."""
    REPUBLISH = "republish"
    """Send the original record back to its topic (or a chosen one) so the original consumer tries again."""


class KeyFormat(Enum):
    """What the handler takes the original records' keys to be."""

    TEXT = "text"
    """UTF-8 text (the default, as nearly every Kafka producer writes keys): a dead letter whose original key is
    not valid UTF-8 is bad input, parked with reason ``undecodable`` and a message saying how to accept it."""
    BYTES = "bytes"
    """Opaque bytes (binary ids, Avro or Protobuf keys): any key is accepted and kept byte for byte."""


def _key_problem(key: bytes | None) -> str | None:
    """Why ``key`` is not UTF-8 text, or None when it is (or there is no key)."""
    if key is None:
        return None
    try:
        key.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start} of {len(key)}"
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


_MAX_RENEWALS = 20
"""Lease renewals a claim may spend waiting for a concurrency slot before it is handed back to due."""
_MIN_SLOT_WAIT = 0.1
"""Seconds a claim waits for a slot between two renewals at the least."""
_MIN_LEASE_SLACK = 1.0
"""Seconds a lease must outlast a processor call by: room to renew it, and to park a record after the call."""


def _downstream_failed(exc: Exception, decision: Decision) -> bool:
    """Does this failed call count against the circuit? Only a failure worth retrying does (or one that would be,
    but ran out of attempts or time): a record parked for its content, by the processor's ParkNow or as
    non-retryable, says nothing about the downstream."""
    if isinstance(exc, ParkNow):
        return False
    return decision.outcome is Outcome.RETRY or decision.reason in (Reason.MAX_ATTEMPTS, Reason.MAX_AGE)


_CLAIM_BATCH = 100
"""Due entries claimed at most per claim."""
_START_CHUNK = 16
"""Attempts started per loop iteration."""
_ROOM_WAIT = 0.5
"""Seconds intake waits at most, per consumed batch, for room in flight to claim records as it schedules them."""
_HOLD_MS = 5000
"""Retries due within this many milliseconds of their reschedule are kept in memory to be claimed back."""
_ROOM_CHUNK = 64
"""Room intake waits for before it schedules (and claims) the next part of a batch."""


@types.coroutine
def _resume(call: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, None, Any]:
    """Await ``call`` from where its first step stopped, that step having been run by hand and yielded
    ``waiting`` (what the coroutine waits on): the rest is ``await call`` (``yield from``). A cancellation that
    arrives while it waits on ``waiting`` goes into ``call``, as it would have."""
    while True:
        try:
            yield waiting
        except BaseException as exc:
            try:
                waiting = call.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        break
    return (yield from call)


def _cap(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


class DLQHandler:
    """The DLQ handler service.

    >>> async def charge(dead_letter: DeadLetter) -> None:          # doctest: +SKIP
    ...     await billing.charge(json.loads(dead_letter.original.value))
    >>> handler = DLQHandler(name="billing", topics=["payments.dlq"], bootstrap_servers="127.0.0.1:9092",
    ...                      redis_url="redis://127.0.0.1:6379/0", processors={"payments": charge})
    >>> async with handler:                                          # doctest: +SKIP
    ...     await stop_event.wait()
    """

    def __init__(
        self,
        *,
        name: str,
        topics: Sequence[str],
        bootstrap_servers: str,
        redis_url: str,
        group_id: str | None = None,
        poison_topic: str | None = None,
        processors: Mapping[str, Processor] | None = None,
        default_processor: Processor | None = None,
        mode: Mode = Mode.PROCESS,
        keys: KeyFormat = KeyFormat.TEXT,
        republish_to: Mapping[str, str] | None = None,
        policies: TopicPolicies | RetryPolicy | None = None,
        classifier: Classifier | None = None,
        breaker: BreakerSettings | None = None,
        processor_timeout: float = 30.0,
        concurrency: int = 64,
        max_in_flight: int = 512,
        lease: float | None = None,
        first_delay: float = 0.0,
        max_record_bytes: int = 8 * 1024 * 1024,
        kafka_config: Mapping[str, Any] | None = None,
        poll_interval: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ConfigError(f"handler name {name!r} must be letters, digits, '-', '_' or '.': it names Redis keys")
        if not topics:
            raise ConfigError("handler 'topics' is empty: name the dead-letter topic(s) to consume")
        if processor_timeout <= 0 or concurrency < 1 or max_in_flight < 1:
            raise ConfigError("processor_timeout, concurrency and max_in_flight must be positive")
        self.name = name
        self.topics = list(topics)
        self.bootstrap_servers = bootstrap_servers
        self.redis_url = redis_url
        self.group_id = group_id or f"kafka-dlq-{name}"
        self.poison_topic = poison_topic
        self.processors: dict[str, Processor] = dict(processors or {})
        self.default_processor = default_processor
        self.mode = mode
        if not isinstance(keys, KeyFormat):
            raise ConfigError(f"handler 'keys' must be KeyFormat.TEXT or KeyFormat.BYTES, got {keys!r}")
        self.keys = keys
        self.republish_to = dict(republish_to or {})
        self.policies = (
            policies if isinstance(policies, TopicPolicies) else TopicPolicies(default=policies or RetryPolicy())
        )
        self.classifier = classifier or Classifier()
        self.breaker_settings = breaker or BreakerSettings()
        self.processor_timeout = processor_timeout
        self.concurrency = concurrency
        self.max_in_flight = max_in_flight
        self.lease = lease if lease is not None else processor_timeout + 30.0
        if self.lease - processor_timeout < _MIN_LEASE_SLACK:
            raise ConfigError(
                f"lease ({self.lease} s) must be at least {_MIN_LEASE_SLACK:g} s longer than processor_timeout "
                f"({processor_timeout} s): room to renew the lease and to park a record after a call, or two "
                "instances could run one record"
            )
        self.first_delay = first_delay
        self.max_record_bytes = max_record_bytes
        self.kafka_config = dict(kafka_config or {})
        self.poll_interval = poll_interval
        self._rng = rng or random.Random()
        self.metrics = HandlerMetrics(name)
        self.probe = LoopLagProbe(window=60.0)  # the gauge is the p99 of the last minute
        self.schedule = RedisSchedule(redis_url, name)
        self._consumer: AsyncConsumer | None = None
        self._producer: AsyncProducer | None = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._reserved = 0  # room in flight held by a claim on its way
        self._starting: deque[Claimed] = deque()  # claims whose attempt tasks are not created yet
        self._starter: asyncio.Handle | None = None
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._running = False
        self._executor: ThreadPoolExecutor | None = None
        self._async_targets: dict[Processor, bool] = {}
        self._sources = SourceReader()  # source files read into linecache off the loop, for stack traces
        self._held: dict[str, tuple[Entry, str, int]] = {}  # rescheduled here: entry, its finish's token, due
        self.processor_calls = 0
        self.started = False

    # ---------------------------------------------------------------- set-up

    def processor(self, topic: str) -> Callable[[Processor], Processor]:
        """Register a processor for an original topic: ``@handler.processor("orders")``."""

        def register(fn: Processor) -> Processor:
            self.processors[topic] = fn
            return fn

        return register

    def poison_topic_for(self, dlq_topic: str) -> str:
        return self.poison_topic or f"{dlq_topic}.poison"

    def breaker(self, topic: str) -> CircuitBreaker:
        found = self._breakers.get(topic)
        if found is None:
            found = self._breakers[topic] = CircuitBreaker(self.breaker_settings)
        return found

    async def start(self) -> None:
        """Connect to Redis and Kafka, check the poison topics exist, and start consuming and retrying."""
        if self.started:
            raise KafkaDLQError("this handler was started already; create a new one")
        self.started = True
        self.probe.start()
        self._executor = ThreadPoolExecutor(max_workers=min(32, self.concurrency), thread_name_prefix="kafka-dlq-sync")
        await self.schedule.start()
        if not self.schedule.aof_enabled:
            log.warning(
                "handler %s: Redis at %s has AOF persistence off: a Redis restart loses the retry schedule "
                "(turn on appendonly; `kafka-dlq doctor` checks it)",
                self.name,
                self.redis_url,
            )
        base = {"bootstrap.servers": self.bootstrap_servers, **self.kafka_config}
        self._producer = AsyncProducer(
            # Room for any dead letter the DLQ topic held; a poison topic too small for one gets a stub instead.
            {**base, "message.max.bytes": max(self.max_record_bytes * 4, 64 * 1024 * 1024)},
            name=f"{self.name}-poison",
        )
        await self._producer.start()
        for topic in {self.poison_topic_for(t) for t in self.topics} | set(self.republish_to.values()):
            await self._producer._check_topic(topic)
        self._consumer = AsyncConsumer(
            {**base, "group.id": self.group_id, "fetch.max.bytes": max(self.max_record_bytes * 2, 52_428_800)},
            self.topics,
            max_pending=2000,
        )
        await self._consumer.start()
        self._running = True
        self._tasks = [
            asyncio.create_task(self._intake_loop(), name=f"kafka-dlq-{self.name}-intake"),
            asyncio.create_task(self._retry_loop(), name=f"kafka-dlq-{self.name}-retry"),
            asyncio.create_task(self._gauges_loop(), name=f"kafka-dlq-{self.name}-gauges"),
        ]

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop consuming, let in-flight retries finish (or hand them back), commit, close; within ``timeout``."""
        if not self._running and not self.started:
            return
        self._running = False
        self._wake.set()
        deadline = asyncio.get_running_loop().time() + timeout
        for task in self._tasks[:2]:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, max(0.1, deadline - asyncio.get_running_loop().time()) / 2)
        if self._starter is not None:
            self._starter.cancel()
        self._start_some(everything=True)  # claims not started yet: their attempts hand them back at once
        if self._active:
            _, pending = await asyncio.wait(
                self._active, timeout=max(0.1, (deadline - asyncio.get_running_loop().time()) / 2)
            )
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        remaining = max(1.0, deadline - asyncio.get_running_loop().time())
        if self._consumer is not None:
            await self._consumer.stop(remaining)
        if self._producer is not None:
            await self._producer.stop(remaining)
        await self.schedule.stop()
        await self.probe.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> DLQHandler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def broken_tasks(self) -> list[str]:
        """Names of the handler's own tasks that ended with an error (none while healthy)."""
        return [
            f"{task.get_name()}: {task.exception()!r}"
            for task in self._tasks
            if task.done() and not task.cancelled() and task.exception() is not None
        ]

    async def readiness(self) -> tuple[bool, str]:
        """Ready when running, its tasks healthy and Redis answering."""
        if not self._running:
            return False, "not running"
        if broken := self.broken_tasks():
            return False, "; ".join(broken)
        try:
            await asyncio.wait_for(self.schedule.client.ping(), 2.0)
        except Exception as exc:
            return False, f"Redis does not answer: {exc}"
        return True, "consuming"

    def get_metrics(self) -> dict[str, Any]:
        """Counts by outcome (and the seed system's names), pending, loop lag and circuit states."""
        return {
            **self.metrics.as_dict(),
            "loop_lag_ms": self.probe.summary(),
            "circuits": {topic: breaker.state.value for topic, breaker in self._breakers.items()},
            "processor_calls": self.processor_calls,
        }

    # ---------------------------------------------------------------- intake: DLQ topic -> schedule or poison

    async def _intake_loop(self) -> None:
        assert self._consumer is not None
        while self._running:
            batch = await self._consumer.getmany(max_records=500, timeout=0.5)
            progress = _BatchProgress()
            while batch:
                try:
                    await self._intake(batch, progress)
                    self._consumer.done_many(batch)
                    batch = []
                except KafkaDLQError as exc:
                    # Redis or Kafka refused an outcome: keep the batch (nothing is committed) and try again the
                    # records whose outcome is not durable yet; those that are were counted once and stay done.
                    log.error(
                        "handler %s: could not record the outcome of %d of %d dead letters (%s); retrying",
                        self.name,
                        len(batch) - len(progress.done),
                        len(batch),
                        exc,
                    )
                    await asyncio.sleep(1.0)
                    if not self._running:
                        return

    async def _intake(self, batch: list[KafkaRecord], progress: _BatchProgress) -> None:
        """Schedule or park each record of ``batch`` not yet in ``progress.done``; count each once, when its
        outcome is durable. Raises the first error after recording every outcome that did go through."""
        now = _now_ms()
        to_schedule: list[tuple[int, str, Entry, int]] = []
        # Parks are started together once the batch is read (as callables, so that an error while reading the
        # batch leaves no coroutine that is never awaited).
        parks: list[tuple[int, str, Callable[[], Awaitable[None]]]] = []
        slices = Slices()
        for index, record in enumerate(batch):
            await slices.pause()  # decoding is CPU work: let the loop serve others between slices
            if index in progress.done:
                continue
            decoded = decode(record)
            if isinstance(decoded, Undecodable):
                parks.append((index, record.topic, partial(self._park_raw, record, Reason.UNDECODABLE, decoded.reason)))
                continue
            topic = decoded.original.topic
            if self.keys is KeyFormat.TEXT and (problem := _key_problem(decoded.original.key)) is not None:
                decision = Decision.park(
                    Reason.UNDECODABLE,
                    f"the original key is not UTF-8 text ({problem}): if this topic's keys are binary, "
                    'accept them byte for byte with DLQHandler(keys=KeyFormat.BYTES) (config: keys = "bytes")',
                )
                parks.append((index, topic, partial(self._park, record.topic, decoded, decision)))
                continue
            size = len(decoded.original.value or b"") + len(decoded.original.key or b"")
            if size > self.max_record_bytes:
                decision = Decision.park(
                    Reason.NON_RETRYABLE,
                    f"record is {size} bytes, over the handler's max_record_bytes "
                    f"({self.max_record_bytes}): raise it to process such records",
                )
                parks.append((index, topic, partial(self._park, record.topic, decoded, decision)))
                continue
            repeats = 0
            if decoded.redrive_count > 0 and self.classifier.repeat_offender_threshold is not None:
                # Counted in Redis once per record, not once per try of the batch.
                if index not in progress.repeats:
                    progress.repeats[index] = await self.schedule.count_repeat(decoded.fingerprint(), str(decoded.dlq))
                repeats = progress.repeats[index]
            decision = self.classifier.classify(
                decoded.failure,
                policy=self.policies.for_topic(topic),
                attempts=decoded.attempts,
                first_failure_ms=decoded.first_failure,
                now_ms=now,
                has_processor=self._target(topic) is not None,
                repeat_failures=repeats,
            )
            if decision.outcome is Outcome.PARKED:
                parks.append((index, topic, partial(self._park, record.topic, decoded, decision)))
            else:
                to_schedule.append((index, topic, Entry(dead_letter=decoded), now + int(self.first_delay * 1000)))

        # Each record is done (and counted consumed) the moment its own outcome is durable, not once the whole
        # batch is: a slow park must not leave a record that already recovered uncounted.
        async def schedule_all() -> None:
            # Records due now are claimed by the very script that schedules them, as room in flight allows, and run
            # from memory: the same as a claim the instant after, without reading them back. Their bodies are in
            # Redis first, under a lease, so a crash, a rebalance (the next owner finds them scheduled and leaves
            # them) or a second instance changes nothing. Due retries are not starved: the retry loop takes any
            # room that frees, intake waits for room for a part of its batch (_ROOM_CHUNK).
            waiting = to_schedule
            deadline = asyncio.get_running_loop().time() + _ROOM_WAIT
            while waiting:
                room = 0
                if self.first_delay <= 0:
                    room = await self._wait_for_room(len(waiting), deadline)
                chunk = waiting[:room] if room else waiting  # no room (in time): the rest waits in due
                waiting = waiting[len(chunk) :]
                self._reserved += room
                try:
                    _, claimed = await self.schedule.add_and_claim(
                        [(entry, due) for _, _, entry, due in chunk], room, self.lease, slices=slices
                    )
                finally:
                    self._unreserve(room)
                consumed: dict[str, int] = {}
                for index, topic, _, _ in chunk:
                    progress.done.add(index)
                    consumed[topic] = consumed.get(topic, 0) + 1
                for topic, n in consumed.items():
                    self.metrics.count("consumed", topic, n=n)
                self._spawn(claimed)
                if len(claimed) < len(chunk):
                    self._wake.set()

        async def park(index: int, topic: str, parking: Callable[[], Awaitable[None]]) -> None:
            await parking()
            progress.done.add(index)
            self.metrics.count("consumed", topic)

        if not parks:
            await schedule_all()  # the common case, without a task for it
            return
        results = await asyncio.gather(schedule_all(), *(park(*p) for p in parks), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _target(self, topic: str) -> Processor | None:
        if self.mode is Mode.REPUBLISH:
            return self._republish
        return self.processors.get(topic, self.default_processor)

    # ---------------------------------------------------------------- retries: schedule -> processor

    def _room(self) -> int:
        """Claims this instance may take now: ``max_in_flight`` less those running, starting and on their way."""
        return self.max_in_flight - len(self._active) - len(self._starting) - self._reserved

    def _unreserve(self, n: int) -> None:
        """A claim on its way is through: its tasks hold their room now, and what it did not take is free again
        (which whoever waits for room must hear: no attempt may end to tell them)."""
        self._reserved -= n
        if n:
            self._slot_freed.set()

    async def _wait_for_room(self, wanted: int, deadline: float) -> int:
        """Room for up to ``wanted`` claims, waiting until ``deadline`` (loop time) at most for attempts to finish
        and make room for ``_ROOM_CHUNK`` of them (or all, when fewer); 0 when there is none by then.

        Waiting is the cheaper way when the loop is what limits the rate: a record scheduled for lack of room is
        read back and decoded by a claim a moment later. It is bounded, so that slow processors do not keep
        records out of the schedule (and from being committed) for long: after it, what does not fit is scheduled
        in due as usual.
        """
        enough = min(wanted, _ROOM_CHUNK, self.max_in_flight)
        loop = asyncio.get_running_loop()
        while (room := self._room()) < enough and self._running:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), left)
        return max(0, min(room, wanted))

    def _spawn(self, claimed: Sequence[Claimed]) -> None:
        """Start an attempt for each claim (their room is theirs from here on), ``_START_CHUNK`` per loop
        iteration: the first steps of the attempts started together run together, in the next iteration."""
        self._starting.extend(claimed)
        if self._starting and self._starter is None:
            self._starter = asyncio.get_running_loop().call_soon(self._start_some)

    def _start_some(self, everything: bool = False) -> None:
        self._starter = None
        starting, active, loop = self._starting, self._active, asyncio.get_running_loop()
        for _ in range(len(starting) if everything else min(_START_CHUNK, len(starting))):
            task = loop.create_task(self._attempt(starting.popleft()))
            active.add(task)
            task.add_done_callback(self._attempt_done)
        if starting:
            self._starter = loop.call_soon(self._start_some)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slot_freed.set()

    def _hold(self, claimed: Claimed, entry: Entry, due_ms: int) -> None:
        """Keep an entry this instance just rescheduled (by ``claimed``'s finish), to claim it back from memory."""
        if due_ms - _now_ms() <= _HOLD_MS and len(self._held) < 2 * self.max_in_flight:
            self._held[entry.id] = (entry, claimed.token, due_ms)

    async def _reclaim_held(self, limit: int) -> list[Claimed]:
        if not self._held or limit <= 0:
            return []
        now = _now_ms()
        due = [held for held in self._held.values() if held[2] <= now][:limit]
        if not due:
            return []
        for entry, _, _ in due:
            del self._held[entry.id]
        return await self.schedule.reclaim([(entry, token) for entry, token, _ in due], self.lease, now)

    async def _retry_loop(self) -> None:
        while self._running:
            room = self._room()
            if room <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            asked = min(room, _CLAIM_BATCH)
            self._reserved += asked
            try:
                # Retries this instance rescheduled itself come back from memory when due (their bodies are
                # what it wrote: no need to read and decode them); the regular claim takes the rest.
                reclaimed = await self._reclaim_held(asked)
                if reclaimed:
                    self._unreserve(len(reclaimed))
                    asked -= len(reclaimed)
                    self._spawn(reclaimed)
                claimed, next_due = await self.schedule.claim(asked, self.lease) if asked else ([], None)
            except KafkaDLQError as exc:
                log.error("handler %s: claiming due retries failed (%s); trying again", self.name, exc)
                await asyncio.sleep(1.0)
                continue
            finally:
                self._unreserve(asked)
            for item in claimed:
                self._held.pop(item.entry.id, None)
            self._spawn(claimed)
            if not claimed and not reclaimed:
                wait = self.poll_interval
                if next_due is not None:
                    wait = min(wait, max(0.0, (next_due - _now_ms()) / 1000))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.005))

    async def _attempt(self, claimed: Claimed) -> None:
        dead_letter = claimed.entry.dead_letter
        topic = dead_letter.original.topic
        breaker: CircuitBreaker | None = None
        permit: Permit | None = None  # the breaker's leave for this call, handed back once, with its verdict
        try:
            target = self._target(topic)
            if target is None:
                await self._finish_parked(claimed, Decision.park(Reason.NO_PROCESSOR, f"no processor for {topic!r}"))
                return
            breaker = self.breaker(topic)
            semaphore = self._semaphores.get(topic)
            if semaphore is None:
                semaphore = self._semaphores[topic] = asyncio.Semaphore(self.concurrency)
            kept, slot = await self._acquire(semaphore, claimed)
            if kept is None:
                self.metrics.lost_claims.labels(self.name).inc()
                return
            claimed = kept
            if not slot:
                # Waited for a slot through _MAX_RENEWALS renewals: back to due, for whichever instance has room.
                await self.schedule.defer(claimed, _now_ms())
                return
            if not self._running:
                # Stopping: a claim that got its slot only now starts no new call; it goes back to due at once.
                semaphore.release()
                await self.schedule.defer(claimed, _now_ms())
                return
            deferred = False
            failed: tuple[Entry, Decision] | None = None
            try:
                # Asked once a slot is free, not before: a claim that queued for the slot while the circuit
                # opened must not call the downstream.
                if (permit := breaker.allow()) is not None:
                    started = time.perf_counter()
                    try:
                        self.processor_calls += 1
                        await self._call(target, dead_letter)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        self.metrics.latency(topic).observe(time.perf_counter() - started)
                        decision, updated = self._judge(claimed.entry, exc)
                        if _downstream_failed(exc, decision):
                            breaker.failure(permit)
                        else:
                            breaker.abandon(permit)
                        permit = None
                        self.metrics.circuit_of(topic).set(breaker.state.gauge)
                        failed = updated, decision
                    else:
                        self.metrics.latency(topic).observe(time.perf_counter() - started)
                        breaker.success(permit)
                        permit = None
                else:
                    deferred = True
            finally:
                # The slot bounds calls to the downstream: it is free once the call is over, before the outcome
                # is written (a retry rescheduled, a record parked), as after a call that worked.
                semaphore.release()
            if failed is not None:
                await self._failed(claimed, *failed)
                return
            if deferred:
                await self.schedule.defer(claimed, _now_ms() + int(breaker.retry_in() * 1000))
                self.metrics.count("deferred", topic)
                return
            if await self.schedule.finish(claimed, Outcome.RECOVERED, history={"topic": topic}):
                self.metrics.count("recovered", topic)
            else:
                self.metrics.lost_claims.labels(self.name).inc()
        except asyncio.CancelledError:
            # Shutting down mid-call: hand the entry back now rather than after its lease.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.schedule.defer(claimed, _now_ms()))
            raise
        except KafkaDLQError as exc:
            log.error("handler %s: %s: %s; the entry returns when its lease expires", self.name, claimed.entry.id, exc)
        finally:
            if permit is not None and breaker is not None:
                breaker.abandon(permit)  # no verdict reached (cancelled, an error of ours): free the trial

    async def _acquire(self, semaphore: asyncio.Semaphore, claimed: Claimed) -> tuple[Claimed | None, bool]:
        """Wait for a slot of the topic's concurrency, keeping the claim's lease alive meanwhile.

        Returns ``(claim, True)`` holding a slot, the claim renewed if it had to be, with a lease that outlasts a
        call of ``processor_timeout``; ``(None, False)`` when the claim was lost, and then no slot is held and the
        record must not be called; ``(claim, False)`` after ``_MAX_RENEWALS`` renewals without a slot: the caller
        hands the entry back. Without the renewals a claim queued here past its lease would be claimed again (by
        this instance or another) and the record processed twice at once.
        """
        lease_ms = self.lease * 1000
        # Renew once less than a call's time plus half the lease's slack is left: room for the renewal itself.
        keep_ms = self.processor_timeout * 1000 + (self.lease - self.processor_timeout) * 500
        # However slow the renewals are (a round trip over half the slack leaves no time before the next one is
        # due), the slot is tried between them, and waited for a little: never renewals alone, for ever.
        least = min(_MIN_SLOT_WAIT, (self.lease - self.processor_timeout) / 4)
        for _ in range(_MAX_RENEWALS + 1):
            left_ms = claimed.claimed_at_ms + lease_ms - _now_ms()
            if not semaphore.locked():
                if left_ms < keep_ms:
                    # A free slot, but too little lease for a whole call (the claim waited for its turn, or for
                    # the write that took it to be durable): renew first, or the lease could end mid-call and
                    # another instance run the record at the same time.
                    renewed = await self.schedule.renew(claimed, self.lease)
                    if renewed is None:
                        return None, False
                    claimed = renewed
                    if semaphore.locked():  # taken during the renewal: wait for it as below, renewing as needed
                        continue
                await semaphore.acquire()  # free: taken at once, without a wait
                return claimed, True
            wait = max(least, (left_ms - keep_ms) / 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await semaphore.acquire()
                    return claimed, True
            renewed = await self.schedule.renew(claimed, self.lease)
            if renewed is None:
                return None, False
            claimed = renewed
        return claimed, False

    async def _call(self, target: Processor, dead_letter: DeadLetter) -> None:
        loop = asyncio.get_running_loop()
        if not self._is_async(target):
            async with asyncio.timeout(self.processor_timeout):
                result = await loop.run_in_executor(self._executor, target, dead_letter)
                if inspect.isawaitable(result):
                    await result
            return
        deadline = loop.time() + self.processor_timeout
        call = target(dead_letter)
        if type(call) is not types.CoroutineType:  # an awaitable of another kind: awaited as it is
            async with asyncio.timeout_at(deadline):
                await cast(Awaitable[None], call)
            return
        # The first step runs here, in this attempt's own task: a processor that finishes without waiting on
        # anything could not have been interrupted by a timeout, and needs no timer (one per call is a good part
        # of a fast processor's cost). One that waits goes on under the timeout, counted from the call's start.
        try:
            waiting = call.send(None)
        except StopIteration:
            return
        async with asyncio.timeout_at(deadline):
            await _resume(call, waiting)

    def _is_async(self, target: Processor) -> bool:
        try:
            known = self._async_targets.get(target)
        except TypeError:  # an unhashable callable object (a dataclass with __call__, say)
            return inspect.iscoroutinefunction(target)
        if known is None:
            known = self._async_targets[target] = inspect.iscoroutinefunction(target)
        return known

    def _judge(self, entry: Entry, exc: Exception) -> tuple[Decision, Entry]:
        """What a failed call means for the entry: the decision, and the entry with this failure counted."""
        dead_letter = entry.dead_letter
        now = _now_ms()
        failure = Failure(
            error_class=qualified_name(exc),
            message=_cap(str(exc), MAX_MESSAGE_BYTES),
            stacktrace=_cap(format_traceback(exc, MAX_STACKTRACE_BYTES, self._sources), MAX_STACKTRACE_BYTES),
        )
        policy = self.policies.for_topic(dead_letter.original.topic)
        attempts = dead_letter.attempts + 1
        first = dead_letter.first_failure if dead_letter.first_failure is not None else now
        decision = self.classifier.classify(exc, policy=policy, attempts=attempts, first_failure_ms=first, now_ms=now)
        updated = replace(
            entry,
            dead_letter=replace(dead_letter, failure=failure, attempts=attempts, first_failure=first, last_failure=now),
            handler_failures=entry.handler_failures + 1,
        )
        return decision, updated

    async def _failed(self, claimed: Claimed, updated: Entry, decision: Decision) -> None:
        topic = updated.dead_letter.original.topic
        if decision.outcome is Outcome.PARKED:
            # The call may have used most of the lease: renew it before writing to the poison topic, or the lease
            # could end during the write and another instance run the record while it is parked (two doors).
            kept = await self.schedule.renew(claimed, self.lease)
            if kept is None:
                self.metrics.lost_claims.labels(self.name).inc()
                return
            await self._finish_parked(replace(kept, entry=updated), decision, original_claim=kept)
            return
        delay = decision.delay
        if delay is None:
            policy = self.policies.for_topic(topic)
            delay = policy.next_delay(updated.handler_failures, rng=self._rng, previous_delay=claimed.entry.last_delay)
        updated = replace(updated, last_delay=delay)
        due_ms = _now_ms() + int(delay * 1000)
        if await self.schedule.finish(claimed, Outcome.RETRY, entry=updated, due_ms=due_ms):
            self._hold(claimed, updated, due_ms)
            self.metrics.count("retried", topic)
            self.metrics.delay().observe(delay)
        else:
            self.metrics.lost_claims.labels(self.name).inc()

    async def _finish_parked(self, claimed: Claimed, decision: Decision, original_claim: Claimed | None = None) -> None:
        dead_letter = claimed.entry.dead_letter
        assert dead_letter.dlq is not None
        await self._park(dead_letter.dlq.topic, dead_letter, decision, count=False)
        if await self.schedule.finish(
            original_claim or claimed,
            Outcome.PARKED,
            history={"topic": dead_letter.original.topic, "reason": str(decision.reason), "detail": decision.detail},
        ):
            self.metrics.count("parked", dead_letter.original.topic, decision.reason)
        else:
            self.metrics.lost_claims.labels(self.name).inc()

    # ---------------------------------------------------------------- doors out: poison and republish

    async def _park(self, dlq_topic: str, dead_letter: DeadLetter, decision: Decision, *, count: bool = True) -> None:
        """Write the dead letter to the poison topic with its reason; returns once the broker has it (acks=all)."""
        assert self._producer is not None
        reason = decision.reason or Reason.MANUAL
        parked = replace(dead_letter, reason=reason)
        if decision.detail and reason is not Reason.MAX_ATTEMPTS:
            message = dead_letter.failure.message or ""
            parked = replace(
                parked,
                failure=replace(
                    dead_letter.failure,
                    message=_cap(
                        f"{message} [parked: {decision.detail}]" if message else f"[parked: {decision.detail}]",
                        MAX_MESSAGE_BYTES,
                    ),
                ),
            )
        encoded = encode_native(parked)
        poison = self.poison_topic_for(dlq_topic)
        try:
            await self._producer.produce(poison, encoded.value, key=encoded.key, headers=encoded.headers)
        except RecordTooLargeError:
            # The poison topic cannot hold this record: park it without its value, saying so and where the
            # original stays (the dead letter at its DLQ coordinates), rather than retrying forever.
            size = len(dead_letter.original.value or b"")
            note = f"value of {size} bytes not copied: over the poison topic's limit; original at {dead_letter.dlq}"
            message = parked.failure.message or ""
            stub = replace(
                parked, failure=replace(parked.failure, message=_cap(f"{message} [{note}]", MAX_MESSAGE_BYTES))
            )
            encoded = encode_native(replace(stub, original=replace(stub.original, value=None)))
            await self._producer.produce(poison, None, key=encoded.key, headers=encoded.headers)
        if count:
            self.metrics.count("parked", dead_letter.original.topic, reason)

    async def _park_raw(self, record: KafkaRecord, reason: Reason, detail: str) -> None:
        """A record no decoder accepts goes to the poison topic as it was, with the reason beside it."""
        assert self._producer is not None
        poison = self.poison_topic_for(record.topic)

        def headers(message: str) -> tuple[tuple[str, bytes | None], ...]:
            return (
                *record.headers,
                ("dlq.reason", reason.value.encode()),
                ("dlq.error.class", b"kafka_dlq.Undecodable"),
                ("dlq.error.message", _cap(message, MAX_MESSAGE_BYTES).encode()),
            )

        try:
            await self._producer.produce(poison, record.value, key=record.key, headers=headers(detail))
        except RecordTooLargeError:
            # As _park: a value the poison topic cannot hold is left out, saying so, rather than retrying the
            # batch (and stalling the partition) forever. The original stays at its DLQ coordinates.
            where = DlqCoordinates(topic=record.topic, partition=record.partition, offset=record.offset)
            size = len(record.value or b"")
            note = f"value of {size} bytes not copied: over the poison topic's limit; original at {where}"
            await self._producer.produce(poison, None, key=record.key, headers=headers(f"{detail} [{note}]"))
        self.metrics.count("parked", record.topic, reason)

    async def _republish(self, dead_letter: DeadLetter) -> None:
        """Republish mode's processor: the original record back to its topic, with the attempt headers."""
        assert self._producer is not None
        target = self.republish_to.get(dead_letter.original.topic, dead_letter.original.topic)
        encoded = encode_native(dead_letter)
        await self._producer.produce(target, encoded.value, key=encoded.key, headers=encoded.headers)

    # ---------------------------------------------------------------- gauges

    async def _gauges_loop(self) -> None:
        while self._running:
            try:
                pending = await self.schedule.pending()
                self.metrics.set_pending(pending["total"])
            except KafkaDLQError:
                pass
            except Exception as exc:  # a gauge must never take the handler down
                log.debug("gauges: %s", exc)
            self.metrics.loop_lag.labels(self.name).set(self.probe.percentile(0.99) / 1000)
            for topic, breaker in self._breakers.items():
                self.metrics.circuit.labels(self.name, topic).set(breaker.state.gauge)
            await asyncio.sleep(1.0)
