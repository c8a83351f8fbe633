"""The retrying consumer: run an application's handler on a topic, retry briefly in place, then dead-letter.

Two pieces, so that a unit test runs exactly the logic production runs:

- :class:`RetryEngine`, broker-independent: runs the handler under a concurrency limit (and, optionally, in key
  order), classifies failures with the same :class:`~kafka_dlq.classify.Classifier` as the DLQ handler, retries
  retryable ones in place within a bounded budget, and builds the dead letter. Where the dead letter goes and what
  "done" means are given to it as two callables.
- :class:`RetryingConsumer`, the Kafka-backed one: the engine fed by an
  :class:`~kafka_dlq.kafka.AsyncConsumer`, writing dead letters with an :class:`~kafka_dlq.kafka.AsyncProducer`,
  marking a source offset done only after its dead letter's delivery report. Its in-memory twin for users' unit
  tests is :class:`kafka_dlq.testing.memory.MemoryRetryingConsumer`.

Decisions, each explained where it is made:

- **In-place retry budget.** A record's in-place retries end ``retry_budget`` seconds (default 7.5) after its first
  call started, on a monotonic clock: time inside the handler counts as much as time in backoff. A retry whose
  backoff would end past the budget is not taken, the record goes to the DLQ. And whatever the policy or the
  handler says (``RetryLater`` included, whose delay may be 0), a delivery gets at most ``policy.max_attempts``
  calls and never more than :data:`MAX_IN_PLACE_ATTEMPTS`: in-place retry is short by design, the DLQ handler is
  where long retries belong. The Kafka-backed consumer caps the budget at half of its revoke timeout (the revoke
  timeout is 80% of ``max.poll.interval.ms``, 15 s at most: so 7.5 s at most). The client thread keeps polling
  while handlers run, so group membership is never at risk from a slow handler; but at a rebalance the thread
  waits (in the revoke callback, not polling) for records in progress, for at most the revoke timeout, and the
  coordinator gives members ``max.poll.interval.ms`` to rejoin. A record in a longer retry would hold the
  rebalance, then be read again by the partition's next owner. Half, not all of it: one call is bounded only by
  ``handler_timeout``, so a retry started just inside the budget runs on after it, and the other half is its
  room to end before the revoke gives up.
- **Redrive carry-forward.** A record carrying native dead-letter headers (a redrive or the DLQ handler's
  republish mode sent it back) is decoded with :func:`kafka_dlq.formats.decode`: its attempts, first failure and
  redrive count carry over into the next dead letter, so a record's history is never reset by a round trip.
- **Header stripping.** The handler gets the record with those ``dlq.*`` headers (and the Spring-compatible
  ``kafka_dlt-*`` copy written after them) removed: it sees the record as it was first produced, the same on a
  first delivery and after a redrive. The history is available through :func:`current_attempt`.
- **Ordering.** :attr:`Ordering.UNORDERED` (default) runs records concurrently up to the limit, which the client
  layer's done-watermark commits support. :attr:`Ordering.KEY` runs the records of one key (per topic) one at a
  time in offset order, as Confluent's Parallel Consumer does in KEY mode: a later record of a key waits behind
  one in retry, and starts only once that one is processed or its dead letter is delivered. A record waiting
  behind its key holds a concurrency slot as a running one does, so at most ``concurrency`` records are taken in
  at once, running or waiting. When a record's dead letter cannot be written at all, its key stops: the records
  queued behind it (and any later one of that key) are left undone, not marked done, so that after a restart
  (or by the partition's next owner) they are read again behind it, in order; the key stays stopped until its
  partition is revoked. At a revoke, the records of the revoked partitions still waiting behind their key are
  handed back unprocessed instead of run: only the record a key is running holds the rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

from kafka_dlq.classify import Classifier, qualified_name
from kafka_dlq.errors import ClientClosedError, ConfigError, KafkaClientError, KafkaDLQError, RecordTooLargeError
from kafka_dlq.formats import MAX_MESSAGE_BYTES, MAX_STACKTRACE_BYTES, EncodedRecord, decode, encode_native
from kafka_dlq.formats import native as native_format
from kafka_dlq.formats._common import MAX_ATTEMPTS, MAX_EPOCH_MS
from kafka_dlq.formats.spring import DLT_PREFIX
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, KafkaRecord
from kafka_dlq.kafka.record import Headers
from kafka_dlq.outcomes import Reason
from kafka_dlq.policy import Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord
from kafka_dlq.tracebacks import SourceReader, format_traceback

__all__ = [
    "MAX_IN_PLACE_ATTEMPTS",
    "Attempt",
    "DeadLetterWriter",
    "Ordering",
    "RecordHandler",
    "RetryEngine",
    "RetryingConsumer",
    "current_attempt",
    "default_in_place_policy",
]

log = logging.getLogger("kafka_dlq.retrying")

RecordHandler = Callable[[KafkaRecord], Awaitable[None] | None]
"""The application's handler: returns when the record is handled, raises when it is not. Async handlers run on
the loop; sync ones in a thread (one per concurrency slot), never on the loop."""

DeadLetterWriter = Callable[[str, EncodedRecord, DeadLetter], Awaitable[None]]
"""Writes a dead letter to a topic and returns once it is durable (for Kafka: its delivery report came)."""

MAX_IN_PLACE_ATTEMPTS = 10
"""The most calls one delivery of a record gets in place, whatever the policy's ``max_attempts`` (None included)
or the handler's ``RetryLater`` say: with a zero delay nothing else would stop a retry loop that spins as fast
as the handler fails. Spring's ``DefaultErrorHandler`` also stops at 10."""


class Ordering(Enum):
    """In what order records reach the handler."""

    UNORDERED = "unordered"
    """Concurrently, up to the concurrency limit, in any order. Fastest; a record in retry holds back nothing but
    its own partition's commit watermark."""
    KEY = "key"
    """The records of one key (per topic) one at a time, in offset order; different keys concurrently. Costs: a
    key's later records wait for the whole in-place retry of an earlier one (up to ``retry_budget``); a hot key
    runs one record at a time; and each record waiting behind its key holds a concurrency slot, so a hot key in
    retry can take every slot and hold back the other keys until it moves. Records without a key have nothing to
    order by: they run as in UNORDERED."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """What :func:`current_attempt` tells a handler about the call it is in."""

    attempt: int
    """This call's number over the record's whole life: attempts carried from earlier dead letters, plus one."""
    in_place_attempt: int
    """This call's number in this delivery: 1 on the first call, 2 on the first in-place retry ..."""
    redrive_count: int
    """How many times a redrive sent this record back (``dlq.redrive.count``)."""
    first_failure: int | None
    """Epoch milliseconds of the record's first failure, carried across redrives; None if it never failed."""


_ATTEMPT: contextvars.ContextVar[tuple[int, int, int, int | None]] = contextvars.ContextVar("kafka_dlq_attempt")
"""The running call's (attempt, in_place_attempt, redrive_count, first_failure): a tuple, made into an Attempt only
when a handler asks (a frozen dataclass per call costs more than the rest of a fast handler's bookkeeping)."""


def current_attempt() -> Attempt:
    """The attempt the running handler is in; only inside a handler run by a retrying consumer.

    >>> async def handle(record: KafkaRecord) -> None:              # doctest: +SKIP
    ...     if current_attempt().attempt > 1:
    ...         log.info("retrying %s", record.key)
    """
    try:
        attempt, in_place_attempt, redrive_count, first_failure = _ATTEMPT.get()
    except LookupError:
        raise LookupError("current_attempt() is only available inside a handler run by a retrying consumer") from None
    return Attempt(
        attempt=attempt, in_place_attempt=in_place_attempt, redrive_count=redrive_count, first_failure=first_failure
    )


def default_in_place_policy() -> RetryPolicy:
    """The in-place policy when none is given: 3 attempts (2 retries), exponential from 0.1 s, at most 2 s each,
    full jitter. Short on purpose: a record in retry holds its partition's commit watermark (and, with key
    ordering, its key); the DLQ handler is where long retries belong."""
    return RetryPolicy(initial_delay=0.1, max_delay=2.0, multiplier=2.0, jitter=Jitter.FULL, max_attempts=3)


def _seconds(name: str, value: object, *, allow_zero: bool = True) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"{name} must be seconds (a number) or a timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        low = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number of seconds {low}, got {value!r}")
    return seconds


def _cap(text: str, limit: int) -> str:
    # The same cut encode_native makes, so that the dead letter in memory equals the one decoded from the wire.
    data = text.encode("utf-8", "backslashreplace")
    return data[:limit].decode("utf-8", "ignore") if len(data) > limit else data.decode("utf-8")


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ in user code must not lose the record
        return f"<unprintable {type(exc).__name__}>"


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- what a record carries from earlier failures


@dataclass(frozen=True, slots=True)
class _History:
    attempts: int = 0
    first_failure: int | None = None
    redrive_count: int = 0


_NO_HISTORY = _History()


def _lenient_decimal(raw: bytes | None, high: int) -> int | None:
    # Out of range is as unreadable as not a number: carried into the next dead letter, it would make that one
    # undecodable.
    if raw is None or not raw.isdigit() or len(raw) > 18 or int(raw) > high:
        return None
    return int(raw)


def _history(record: KafkaRecord) -> tuple[KafkaRecord, _History]:
    """The record as the handler sees it (native metadata stripped) and the history that metadata carried."""
    ours = native_format.HEADERS
    for name, _ in record.headers:
        if name in ours:
            break
    else:
        return record, _NO_HISTORY
    names = {name for name, _ in record.headers}
    if native_format.TOPIC in names:
        decoded = decode(record)
        if isinstance(decoded, DeadLetter):
            history = _History(decoded.attempts, decoded.first_failure, decoded.redrive_count)
            return dataclasses.replace(record, headers=decoded.original.headers), history
        log.warning(
            "record %s/%d/%d carries broken dead-letter headers (%s): its history is read where it can be",
            record.topic,
            record.partition,
            record.offset,
            decoded.reason,
        )
    # What a redrive leaves on the record it sends back (dlq.attempts, dlq.first.failure and its loop guard
    # dlq.redrive.count, the rest of the dead letter's headers removed), or metadata too broken to decode: keep
    # what parses. Our Spring-compatible copy follows our first header; anything before it belongs to the
    # original record.
    start = next(index for index, (name, _) in enumerate(record.headers) if name in native_format.HEADERS)
    headers: Headers = tuple(
        (name, value)
        for index, (name, value) in enumerate(record.headers)
        if name not in native_format.HEADERS and not (index > start and name.startswith(DLT_PREFIX))
    )
    history = _History(
        attempts=_lenient_decimal(record.header(native_format.ATTEMPTS), MAX_ATTEMPTS) or 0,
        first_failure=_lenient_decimal(record.header(native_format.FIRST_FAILURE), MAX_EPOCH_MS),
        redrive_count=_lenient_decimal(record.header(native_format.REDRIVE_COUNT), MAX_ATTEMPTS) or 0,
    )
    return dataclasses.replace(record, headers=headers), history


# ---------------------------------------------------------------- the engine


@dataclass(slots=True)
class _Counters:
    received: int = 0
    processed: int = 0
    failed_attempts: int = 0
    retried_in_place: int = 0
    dead_lettered: int = 0
    dead_lettered_non_retryable: int = 0
    left_undone: int = 0
    released_at_revoke: int = 0
    finished: int = 0


class RetryEngine:
    """Runs a handler on records: concurrency limit, ordering, classify, in-place retry, dead letter. No broker.

    ``write_dead_letter(topic, encoded, dead_letter)`` makes a dead letter durable; ``mark_done(record)`` is called
    once the record's outcome is durable (processed, or its dead letter written), never before; ``release(record)``
    when the engine gives a record up without an outcome (left undone, or handed back by :meth:`revoke`), so that
    its source stops waiting for it and reads it again later. Call :meth:`revoke` when partitions go to another
    consumer. With key ordering, a key whose record has no durable outcome stays stopped until that record's
    partition is revoked (the Kafka-backed consumer stops altogether on such a failure, through ``on_error``).
    ``sleep`` waits a backoff; ``clock`` is the monotonic clock (seconds) the in-place budget is measured on, so a
    ``sleep`` that does not wait (a test's) should move it on; ``now_ms`` is the wall clock for failure times.

    >>> engine = RetryEngine(handle, group_id="orders", write_dead_letter=write, mark_done=done)  # doctest: +SKIP
    >>> await engine.submit(record)                                  # doctest: +SKIP
    >>> await engine.drain()                                         # doctest: +SKIP
    """

    def __init__(
        self,
        handler: RecordHandler,
        *,
        group_id: str | None,
        write_dead_letter: DeadLetterWriter,
        mark_done: Callable[[KafkaRecord], None],
        dlq_topic: str | Callable[[str], str] | None = None,
        classifier: Classifier | None = None,
        policy: RetryPolicy | None = None,
        retry_budget: float | timedelta = 7.5,
        concurrency: int = 64,
        ordering: Ordering = Ordering.UNORDERED,
        spring_compatible: bool = False,
        handler_timeout: float | timedelta | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        now_ms: Callable[[], int] = _now_ms,
        rng: random.Random | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        release: Callable[[KafkaRecord], None] | None = None,
    ) -> None:
        if not callable(handler):
            raise ConfigError(f"the handler must be a function of a KafkaRecord, got {handler!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(ordering, Ordering):
            raise ConfigError(f"ordering must be Ordering.UNORDERED or Ordering.KEY, got {ordering!r}")
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ConfigError(f"policy must be a RetryPolicy, got {policy!r}")
        if classifier is not None and not isinstance(classifier, Classifier):
            raise ConfigError(f"classifier must be a Classifier, got {classifier!r}")
        if isinstance(dlq_topic, str) and not dlq_topic:
            raise ConfigError("dlq_topic is empty: name the dead-letter topic, or leave it out for '<topic>.dlq'")
        self.handler = handler
        self.group_id = group_id
        self.classifier = classifier or Classifier()
        self.policy = policy or default_in_place_policy()
        self.retry_budget = _seconds("retry_budget", retry_budget)
        self.concurrency = concurrency
        self.ordering = ordering
        self.spring_compatible = spring_compatible
        self.handler_timeout = (
            None if handler_timeout is None else _seconds("handler_timeout", handler_timeout, allow_zero=False)
        )
        self._dlq_topic = dlq_topic
        self._write = write_dead_letter
        self._mark_done = mark_done
        self._sleep = sleep
        self._clock = clock
        self._now_ms = now_ms
        self._rng = rng or random.Random()
        self._on_error = on_error
        self._hand_back = release
        # An object with an ``async def __call__`` is an async handler too.
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)
        self._executor: ThreadPoolExecutor | None = None
        self._free = concurrency
        self._freed = asyncio.Event()
        wanted = self.policy.max_attempts
        self.in_place_attempts = MAX_IN_PLACE_ATTEMPTS if wanted is None else min(wanted, MAX_IN_PLACE_ATTEMPTS)
        if wanted is None or wanted > MAX_IN_PLACE_ATTEMPTS:
            log.info(
                "in-place attempts capped at %d (the policy allows %s): longer retries belong to the DLQ handler",
                MAX_IN_PLACE_ATTEMPTS,
                "any number" if wanted is None else wanted,
            )
        self._lanes: dict[tuple[str, bytes], deque[KafkaRecord]] = {}
        # A stopped key, with the partitions whose records of it stopped it: it stays stopped until they are revoked.
        self._stopped_keys: dict[tuple[str, bytes], set[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sources = SourceReader()  # source files read into linecache off the loop, for stack traces
        self.counters = _Counters()

    def dlq_topic_for(self, topic: str) -> str:
        """Where the dead letters of ``topic`` go: ``dlq_topic`` (a name, or a function of the topic), or
        ``<topic>.dlq``."""
        if self._dlq_topic is None:
            return f"{topic}.dlq"
        if isinstance(self._dlq_topic, str):
            return self._dlq_topic
        return self._dlq_topic(topic)

    @property
    def in_flight(self) -> int:
        """Records submitted whose outcome is not durable yet (running, in backoff, or waiting behind their key).
        Records left undone (``left_undone``: cancelled, or given up with no durable outcome) are not in flight:
        nothing more happens to them here, and they are read again after a restart."""
        counters = self.counters
        return counters.received - counters.finished - counters.left_undone - counters.released_at_revoke

    @property
    def free_slots(self) -> int:
        return self._free

    def metrics(self) -> dict[str, int]:
        counters = dataclasses.asdict(self.counters)
        del counters["finished"]
        return {**counters, "in_flight": self.in_flight}

    # ---------------------------------------------------------------- feeding

    async def room(self) -> None:
        """Wait until a concurrency slot is free (without taking it)."""
        while self._free <= 0:
            self._freed.clear()
            await self._freed.wait()

    async def submit(self, record: KafkaRecord) -> None:
        """Take ``record`` once a slot is free: start it, or with key ordering queue it behind its key. Either way
        it holds its slot until its outcome is durable, so intake is bounded by ``concurrency``."""
        await self.room()
        self._free -= 1
        self.counters.received += 1
        if self.ordering is not Ordering.KEY or record.key is None:
            task = asyncio.get_running_loop().create_task(self._guarded(record))
            self._tasks.add(task)
            task.add_done_callback(self._finished)  # one shared callback: no closure per record
            return
        lane_id = (record.topic, record.key)
        if lane_id in self._stopped_keys:
            # An earlier record of this key has no durable outcome: running this one would overtake it.
            self._leave_undone(record)
            return
        lane = self._lanes.get(lane_id)
        if lane is not None:
            lane.append(record)
            return
        lane = self._lanes[lane_id] = deque([record])
        self._spawn(self._run_lane(lane_id, lane), lambda: self._close_lane(lane_id, lane))

    def _leave_undone(self, record: KafkaRecord) -> None:
        """Give ``record`` up without an outcome: not marked done, so it is not committed and is read again."""
        self.counters.left_undone += 1
        self._release()
        self._give_back(record)
        log.warning(
            "%s/%d/%d is left undone behind an earlier record of its key that has no durable outcome; it is read "
            "again after a restart",
            record.topic,
            record.partition,
            record.offset,
        )

    def _spawn(self, work: Coroutine[Any, Any, Any], cleanup: Callable[[], None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)

        # A done callback, not a finally in ``work``: a task cancelled before its first step never runs its
        # coroutine's body, and its slots (and its key's lane) would stay taken for good.
        def finished(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            cleanup()

        task.add_done_callback(finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        """A record's task is over (even cancelled before it started): its slot is free."""
        self._tasks.discard(task)
        self._free += 1
        self._freed.set()

    def _release(self) -> None:
        self._free += 1
        self._freed.set()

    def _give_back(self, record: KafkaRecord) -> None:
        # Nothing more happens to it here: its source must not wait for it (a revoke would, to its timeout).
        if self._hand_back is not None:
            self._hand_back(record)

    def revoke(self, partitions: Iterable[tuple[str, int]]) -> int:
        """``partitions`` are going to another consumer: hand back their records that wait behind their key and
        have not started, and lift the stops of their keys; returns how many records were handed back.

        A revoke waits for every record of the partitions still in progress, and a key may have up to
        ``concurrency`` records queued: run one after the other, they would outlast the revoke's timeout, which
        then commits what is done and lets the partition go while this consumer runs the rest of the queue, as
        the next owner reads the same records again. Handed back instead (through ``release``, their slots
        freed, counted in ``released_at_revoke``), they are not committed past and the next owner reads them, in
        order. The record a key is running finishes: its in-place budget fits in the revoke's wait.
        """
        gone = set(partitions)
        if not gone:
            return 0
        handed_back = 0
        for lane in list(self._lanes.values()):
            # lane[0] is running (or its task about to start it): it stays; only the queue behind it goes.
            waiting = [record for record in itertools.islice(lane, 1, None) if (record.topic, record.partition) in gone]
            if not waiting:
                continue
            head = lane.popleft()
            kept = [record for record in lane if (record.topic, record.partition) not in gone]
            lane.clear()
            lane.append(head)
            lane.extend(kept)
            for record in waiting:
                self.counters.released_at_revoke += 1
                self._release()
                self._give_back(record)
            handed_back += len(waiting)
        # A key stopped by a record of a revoked partition: that record (and those behind it) are the next owner's
        # to read, in order; should the partition come back here, they must run again, not be left undone.
        for lane_id, stopped_by in list(self._stopped_keys.items()):
            stopped_by.difference_update(partition for topic, partition in gone if topic == lane_id[0])
            if not stopped_by:
                del self._stopped_keys[lane_id]
        if handed_back:
            log.info("%d records waiting behind their key handed back at a revoke, for the next owner", handed_back)
        return handed_back

    async def _run_lane(self, lane_id: tuple[str, bytes], lane: deque[KafkaRecord]) -> None:
        # One task per busy key works through the key's records in order; the next record of the key starts only
        # once the previous one's outcome is durable. Each record in the lane holds its own slot.
        try:
            while lane:
                record = lane[0]
                durable = await self._guarded(record)
                lane.popleft()
                self._release()
                if not durable:
                    # Marking the later records done would commit past the earlier one, whose redelivery would
                    # then come after them: stop the key, leave its records for the next owner, in order.
                    self._stopped_keys.setdefault(lane_id, set()).add(record.partition)
                    while lane:
                        self._leave_undone(lane.popleft())
        finally:
            # At once, not in the task's done callback: until then a new record of the key would join this lane.
            self._close_lane(lane_id, lane)

    def _close_lane(self, lane_id: tuple[str, bytes], lane: deque[KafkaRecord]) -> None:
        """End ``lane``, once: the records still in it (cancelled, the running one included) give back their
        slots. Also the task's done callback, for a lane task cancelled before it ran at all."""
        if self._lanes.get(lane_id) is not lane:
            return  # closed already (and the key may have a new lane by now)
        del self._lanes[lane_id]
        for _ in lane:
            self._release()
        lane.clear()

    async def _guarded(self, record: KafkaRecord) -> bool:
        """Process ``record``; True once its outcome is durable, False when it has none (reported to the owner)."""
        try:
            await self._process(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A dead letter that could not be written at all (fatal client error, or a bug): the record is not
            # done, so it is read again after a restart; the owner must know, so it is reported, never swallowed.
            self.counters.left_undone += 1
            log.exception("record %s/%d/%d has no durable outcome", record.topic, record.partition, record.offset)
            self._give_back(record)
            if self._on_error is not None:
                self._on_error(exc)
            return False
        return True

    # ---------------------------------------------------------------- draining

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for every submitted record's outcome, at most ``timeout`` seconds; True when none is left."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel(self) -> int:
        """Cancel every record in progress (they are not marked done: they will be read again); returns how many."""
        left = self.in_flight
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Records cancelled (running, in backoff or queued in a lane) have no outcome: they are read again.
        counters = self.counters
        counters.left_undone = counters.received - counters.finished - counters.released_at_revoke
        return left

    def close(self) -> None:
        """Let go of the sync handlers' threads (running ones finish on their own)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ---------------------------------------------------------------- one record

    async def _process(self, record: KafkaRecord) -> None:
        view, history = _history(record)
        in_place = 0
        started = self._clock()
        previous_delay: float | None = None
        first_failure = history.first_failure
        life_first_failure: int | None = None
        while True:
            in_place += 1
            # A carried count at the format's limit stays there: one more would make the dead letter unreadable.
            attempts = min(history.attempts + in_place, MAX_ATTEMPTS)
            token = _ATTEMPT.set((attempts, in_place, history.redrive_count, first_failure))
            try:
                await self._call(view)
            except Exception as exc:
                error: Exception | None = exc
            else:
                error = None
            finally:
                _ATTEMPT.reset(token)
            if error is None:
                self.counters.processed += 1
                self._mark_done(record)
                self.counters.finished += 1
                return
            self.counters.failed_attempts += 1
            now = self._now_ms()
            first_failure = now if first_failure is None else first_failure
            life_first_failure = now if life_first_failure is None else life_first_failure
            # The in-place policy counts this delivery's attempts: a redriven record with 9 attempts behind
            # it still gets its short in-place retry; the carried count goes into its next dead letter.
            decision = self.classifier.classify(
                error, policy=self.policy, attempts=in_place, first_failure_ms=life_first_failure, now_ms=now
            )
            # The in-place limit holds whatever the decision: the classifier's own limits need not stop a
            # RetryLater(delay=0) here (max_attempts may be None, or above MAX_IN_PLACE_ATTEMPTS).
            if not decision.parked and in_place < self.in_place_attempts:
                delay = decision.delay
                if delay is None:
                    delay = self.policy.next_delay(in_place, rng=self._rng, previous_delay=previous_delay)
                # From the first call: the handler's own time counts, not only the backoffs.
                if self._clock() - started + delay <= self.retry_budget:
                    self.counters.retried_in_place += 1
                    log.debug(
                        "%s/%d/%d failed (%s); retrying in place in %.3f s",
                        record.topic,
                        record.partition,
                        record.offset,
                        qualified_name(error),
                        delay,
                    )
                    previous_delay = delay
                    await self._sleep(delay)
                    continue
            # Parked for a reason other than the in-place limits: non-retryable, or the handler's ParkNow.
            straight = decision.parked and decision.reason not in (Reason.MAX_ATTEMPTS, Reason.MAX_AGE)
            await self._dead_letter(
                record,
                view,
                error,
                attempts=attempts,
                first_failure=first_failure,
                last_failure=now,
                redrive_count=history.redrive_count,
                straight=straight,
            )
            return

    async def _call(self, record: KafkaRecord) -> None:
        timeout = self.handler_timeout
        if self._is_async:
            if timeout is None:  # asyncio.timeout(None) costs a few microseconds a record for nothing
                result = self.handler(record)
                if inspect.isawaitable(result):
                    await result
                return
            async with asyncio.timeout(timeout):
                result = self.handler(record)
                if inspect.isawaitable(result):
                    await result
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="kafka-dlq-handler")
        context = contextvars.copy_context()  # so that current_attempt() works in the handler's thread too
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(self._executor, context.run, self.handler, record)
        async with asyncio.timeout(timeout):
            result = await running
            if inspect.isawaitable(result):
                await result

    async def _dead_letter(
        self,
        record: KafkaRecord,
        view: KafkaRecord,
        error: BaseException,
        *,
        attempts: int,
        first_failure: int,
        last_failure: int,
        redrive_count: int,
        straight: bool,
    ) -> None:
        dead_letter = DeadLetter(
            original=OriginalRecord(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                timestamp=record.timestamp,
                key=record.key,
                value=record.value,
                headers=view.headers,
            ),
            failure=Failure(
                error_class=qualified_name(error),
                message=_cap(_message(error), MAX_MESSAGE_BYTES),
                # Not traceback.format_exception: it stats every source file (I/O on the loop) and parses source
                # lines with ast for its carets, a tenth of a millisecond or more per dead letter.
                stacktrace=_cap(format_traceback(error, MAX_STACKTRACE_BYTES, self._sources), MAX_STACKTRACE_BYTES),
            ),
            attempts=attempts,
            first_failure=first_failure,
            last_failure=last_failure,
            group=self.group_id,
            redrive_count=redrive_count,
        )
        topic = self.dlq_topic_for(record.topic)
        await self._write(topic, encode_native(dead_letter, spring_compatible=self.spring_compatible), dead_letter)
        self.counters.dead_lettered += 1
        if straight:
            self.counters.dead_lettered_non_retryable += 1
        log.info(
            "%s/%d/%d dead-lettered to %s after %d attempt(s): %s",
            record.topic,
            record.partition,
            record.offset,
            topic,
            attempts,
            dead_letter.failure.error_class,
        )
        self._mark_done(record)
        self.counters.finished += 1


# ---------------------------------------------------------------- the Kafka-backed consumer


_BUDGET_SHARE_OF_REVOKE_TIMEOUT = 0.5
_REVOKE_SHARE_OF_POLL_INTERVAL = 0.8
_MAX_REVOKE_TIMEOUT = 15.0
_DEFAULT_MAX_POLL_INTERVAL_MS = 300_000


class RetryingConsumer:
    """Consume ``topics`` and run ``handler`` on each record; failures are retried briefly in place, then written
    to the dead-letter topic with the native headers. A source offset is committed only once its record was
    handled or its dead letter's delivery report came (at least once).

    >>> async def handle(record: KafkaRecord) -> None:              # doctest: +SKIP
    ...     await orders.save(json.loads(record.value))
    >>> consumer = RetryingConsumer(                                 # doctest: +SKIP
    ...     handle,
    ...     topics=["orders"],                     # dead letters go to "orders.dlq"
    ...     group_id="orders-service",
    ...     bootstrap_servers="127.0.0.1:19092",
    ...     classifier=Classifier(non_retryable=[KeyError]),
    ... )
    >>> async with consumer:                                         # doctest: +SKIP
    ...     await stop_event.wait()

    ``policy`` is the in-place policy (default: :func:`default_in_place_policy`); ``retry_budget`` bounds the time
    one record spends in in-place retries from its first call, handler time included (capped at half of the
    revoke timeout, which is 80% of ``max.poll.interval.ms`` and 15 s at most; see the module's notes). Records in
    progress at :meth:`stop` get ``timeout`` seconds to finish; the rest are cancelled and read again by the next
    consumer of the group. ``kafka_config`` goes to both clients (``bootstrap.servers``, security);
    ``consumer_config`` only to the consumer (``max.poll.interval.ms``, ``session.timeout.ms`` ...) and
    ``producer_config`` only to the dead letters' producer (``acks=all`` and idempotence are its defaults).

    Async handlers run on the loop, sync ones in a thread (one per concurrency slot). ``handler_timeout`` bounds
    one call: an async handler is cancelled; a sync one cannot be stopped, so its thread runs on and its result is
    ignored (the record is retried or dead-lettered meanwhile). A record that arrives with native dead-letter
    headers is taken as sent back by a redrive: see the module's notes.
    """

    def __init__(
        self,
        handler: RecordHandler,
        *,
        topics: Sequence[str],
        group_id: str,
        bootstrap_servers: str | None = None,
        kafka_config: Mapping[str, Any] | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        dlq_topic: str | Callable[[str], str] | None = None,
        classifier: Classifier | None = None,
        policy: RetryPolicy | None = None,
        retry_budget: float | timedelta = 7.5,
        concurrency: int = 64,
        ordering: Ordering = Ordering.UNORDERED,
        spring_compatible: bool = False,
        handler_timeout: float | timedelta | None = None,
        max_pending: int = 2000,
    ) -> None:
        if isinstance(topics, str) or not topics:
            raise ConfigError(f"topics must be a non-empty list of topic names, got {topics!r}")
        if not group_id:
            raise ConfigError("group_id is missing: name the consumer group (its offsets and its dead letters' group)")
        config: dict[str, Any] = dict(kafka_config or {})
        if bootstrap_servers is not None:
            config["bootstrap.servers"] = bootstrap_servers
        if "bootstrap.servers" not in config:
            raise ConfigError("no brokers: give bootstrap_servers, or 'bootstrap.servers' in kafka_config")
        consumer_settings = {**config, **(consumer_config or {})}
        if consumer_settings.setdefault("group.id", group_id) != group_id:
            raise ConfigError("the settings' 'group.id' differs from group_id: give the group once, as group_id")
        raw_interval = consumer_settings.get("max.poll.interval.ms", _DEFAULT_MAX_POLL_INTERVAL_MS)
        try:
            poll_interval = float(raw_interval) / 1000
        except (TypeError, ValueError):
            raise ConfigError(f"max.poll.interval.ms must be milliseconds, got {raw_interval!r}") from None
        wanted = _seconds("retry_budget", retry_budget)
        revoke_timeout = min(_MAX_REVOKE_TIMEOUT, poll_interval * _REVOKE_SHARE_OF_POLL_INTERVAL)
        # A record in retry at a rebalance holds the revoke callback: its retries must end before the callback
        # gives up on it (the revoke timeout), and its last call, started just inside the budget, needs room to
        # end too. (Half the revoke timeout is also below half of max.poll.interval.ms, the rejoin deadline.)
        budget = min(wanted, revoke_timeout * _BUDGET_SHARE_OF_REVOKE_TIMEOUT)
        if budget < wanted:
            log.info(
                "retry_budget %.1f s capped at %.1f s: at most half of the revoke timeout (%.1f s; 80%% of "
                "max.poll.interval.ms, %.0f ms, and 15 s at most)",
                wanted,
                budget,
                revoke_timeout,
                poll_interval * 1000,
            )
        self.topics = list(topics)
        self.group_id = group_id
        self.retry_budget = budget
        self.max_pending = max_pending
        self._consumer_config = consumer_settings
        self._producer_config = {**config, **(producer_config or {})}
        self._revoke_timeout = revoke_timeout
        self._engine = RetryEngine(
            handler,
            group_id=group_id,
            write_dead_letter=self._write_dead_letter,
            mark_done=self._mark_done,
            dlq_topic=dlq_topic,
            classifier=classifier,
            policy=policy,
            retry_budget=budget,
            concurrency=concurrency,
            ordering=ordering,
            spring_compatible=spring_compatible,
            handler_timeout=handler_timeout,
            on_error=self._fail,
            release=self._release,
        )
        for topic in self.topics:
            if not topic.startswith("^") and self._engine.dlq_topic_for(topic) in self.topics:
                raise ConfigError(
                    f"the dead letters of {topic!r} would go to {self._engine.dlq_topic_for(topic)!r}, which this "
                    "consumer reads: a failing record would loop; choose another dlq_topic"
                )
        self._consumer: AsyncConsumer | None = None
        self._producer: AsyncProducer | None = None
        self._intake: asyncio.Task[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._started = False
        self._running = False
        self._assigned = 0
        self._revoked = 0

    @property
    def ordering(self) -> Ordering:
        return self._engine.ordering

    def dlq_topic_for(self, topic: str) -> str:
        return self._engine.dlq_topic_for(topic)

    def get_metrics(self) -> dict[str, int]:
        """Counters: received, processed, failed_attempts, retried_in_place, dead_lettered (of which
        dead_lettered_non_retryable went straight there), left_undone (cancelled at a stop, or with no durable
        outcome: read again after a restart), released_at_revoke (waiting behind their key at a revoke: handed
        back for the next owner), in_flight, partitions_assigned, partitions_revoked."""
        return {
            **self._engine.metrics(),
            "partitions_assigned": self._assigned,
            "partitions_revoked": self._revoked,
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, check the source and dead-letter topics exist, join the group and start handling records."""
        if self._started:
            raise ClientClosedError("this consumer was started already; a consumer starts once: create a new one")
        self._started = True
        self._stopped = asyncio.get_running_loop().create_future()
        producer = AsyncProducer(self._producer_config, name=f"retrying-{self.group_id}-dlq")
        consumer = AsyncConsumer(
            self._consumer_config,
            self.topics,
            max_pending=self.max_pending,
            revoke_timeout=self._revoke_timeout,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
        )
        try:
            await producer.start()
            self._producer = producer
            # Fail at start, not at the first failing record, when a dead-letter topic is missing.
            for topic in self.topics:
                if not topic.startswith("^"):
                    await producer._check_topic(self.dlq_topic_for(topic))
            await consumer.start()
            self._consumer = consumer
        except BaseException:
            await consumer.stop()
            await producer.stop()
            self._engine.close()
            self._stopped.set_result(None)
            raise
        self._running = True
        self._intake = asyncio.create_task(self._intake_loop(), name=f"kafka-dlq-retrying-{self.group_id}")

    async def stop(self, timeout: float = 30.0, *, close_timeout: float = 10.0) -> None:
        """Stop taking records; give those in progress ``timeout`` seconds, cancel the rest (they are read again);
        commit what is done and close the clients (``close_timeout`` each). ``stop(0)`` is a forced stop."""
        if not self._started or self._stopped is None or self._stopped.done():
            return
        if not self._running:  # another stop() is in progress: wait for it
            await asyncio.shield(self._stopped)
            return
        self._running = False
        if self._intake is not None:
            self._intake.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._intake
        async with contextlib.AsyncExitStack() as closing:
            # Each step runs whatever the ones before it raise (last in, first out): the producer's thread must
            # end, and run() waits on _stopped.
            closing.callback(self._stopped.set_result, None)
            closing.callback(self._engine.close)
            if self._producer is not None:
                closing.push_async_callback(self._producer.stop, close_timeout)
            if self._consumer is not None:
                closing.push_async_callback(self._consumer.stop, close_timeout)
            if not await self._engine.drain(timeout):
                cancelled = await self._engine.cancel()
                log.warning(
                    "retrying consumer %s: %d records still in progress after %.1f s were cancelled; they will be "
                    "read again",
                    self.group_id,
                    cancelled,
                    timeout,
                )

    async def run(self) -> None:
        """Start (if not started), handle records until :meth:`stop` is called, and raise what made it stop, if
        anything failed. Cancelling ``run`` stops the consumer at once, without draining (a forced stop)."""
        if not self._started:
            await self.start()
        assert self._stopped is not None
        try:
            await asyncio.shield(self._stopped)
        except asyncio.CancelledError:
            await asyncio.shield(self.stop(0))
            raise
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> RetryingConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- records

    async def _intake_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        engine = self._engine
        try:
            while self._running:
                # Take from the client only as many records as there are free slots: the rest stay in its buffer,
                # where a revoke hands them back instead of leaving them to run here after the partition moved.
                await engine.room()
                batch = await consumer.getmany(max_records=max(1, min(500, engine.free_slots)), timeout=0.5)
                for record in batch:
                    await engine.submit(record)
        except KafkaDLQError as exc:
            if self._running:
                self._fail(exc)

    def _mark_done(self, record: KafkaRecord) -> None:
        assert self._consumer is not None
        self._consumer.done(record)

    def _release(self, record: KafkaRecord) -> None:
        if self._consumer is not None:
            self._consumer.release(record)

    async def _write_dead_letter(self, topic: str, encoded: EncodedRecord, dead_letter: DeadLetter) -> None:
        """Produce the dead letter and wait for its delivery report (``acks=all``); transient errors are retried,
        since the source offset must not be marked done before the dead letter is durable."""
        producer = self._producer
        assert producer is not None
        backoff = 0.5
        while True:
            try:
                await producer.produce(topic, encoded.value, key=encoded.key, headers=encoded.headers)
                return
            except RecordTooLargeError:
                # The DLQ topic cannot take the value: write the story without it, saying where the value stays
                # (the source record, until retention removes it), rather than stall the partition for ever.
                original = dead_letter.original
                note = (
                    f"[value of {len(original.value or b'')} bytes not copied: over the dead-letter topic's limit; "
                    f"original at {original.topic}/{original.partition}/{original.offset}]"
                )
                message = _cap(f"{dead_letter.failure.message or ''} {note}".strip(), MAX_MESSAGE_BYTES)
                stub = dataclasses.replace(
                    dead_letter,
                    original=dataclasses.replace(original, value=None),
                    failure=dataclasses.replace(dead_letter.failure, message=message),
                )
                stub_encoded = encode_native(stub, spring_compatible=self._engine.spring_compatible)
                await producer.produce(topic, None, key=stub_encoded.key, headers=stub_encoded.headers)
                return
            except KafkaClientError as exc:
                if exc.fatal or isinstance(exc, ClientClosedError):
                    raise
                log.warning("dead letter to %s not written (%s); trying again in %.1f s", topic, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._running:
            log.error("retrying consumer %s stops: %s", self.group_id, error)
            # Stopping awaits the engine, whose task may be the caller: stop from a task of its own.
            self._stopping = asyncio.get_running_loop().create_task(self.stop())

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self._assigned += len(partitions)

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        # On the loop, while the client's thread waits for the revoked partitions' records in progress: the ones
        # queued behind their key are handed back now, so that it waits only for those running.
        self._revoked += len(partitions)
        self._engine.revoke(partitions)
