"""An asyncio consumer over confluent-kafka that never blocks the loop and commits only what is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from kafka_dlq.errors import ClientClosedError, ConfigError, KafkaClientError, TopicNotFoundError
from kafka_dlq.kafka._thread import ClientState, ClientThread, QuietErrors, librdkafka_log, translate
from kafka_dlq.kafka.offsets import PartitionOffsets, decode_done
from kafka_dlq.kafka.record import KafkaRecord, record_from_wire

R = TypeVar("R")

__all__ = ["AsyncConsumer", "CommitMode", "next_offsets"]

log = logging.getLogger("kafka_dlq.kafka.consumer")

TP = tuple[str, int]


class CommitMode(Enum):
    """Who commits the consumer's offsets."""

    TRACKED = "tracked"
    """The consumer commits, per partition, the contiguous watermark of records marked done (at least once)."""
    EXTERNAL = "external"
    """The application commits (a transaction sends the offsets); ``done`` only frees room for more records."""


def next_offsets(records: Iterable[KafkaRecord]) -> list[TopicPartition]:
    """The offsets to commit after ``records``: per partition, one past the highest offset seen."""
    highest: dict[TP, int] = {}
    for record in records:
        key = (record.topic, record.partition)
        if record.offset >= highest.get(key, -1):
            highest[key] = record.offset
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in highest.items()]


_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "enable.partition.eof": False,
    # When the application drains librdkafka's local queue more slowly than the broker fills it (a handler does
    # work per record), the queue reaches its bound and the fetcher backs off for this long before it looks again.
    # librdkafka's 1 s default then starves the consumer once a second; 10 ms costs nothing measurable here and
    # doubled the rate at which `kafka-dlq bench client` consumed.
    "fetch.queue.backoff.ms": 10,
}
_CONSUME_AT_MOST = 200
"""Records one consume call takes. confluent-kafka builds them holding the GIL, which the loop then waits for:
200 at a time copied faster than 500 and halved the copy's loop-lag p99 (`kafka-dlq bench client`, A/B runs)."""
_SLICE = 100
"""Records built from the thread's batches per turn of the loop (see ``AsyncConsumer._take_slice``)."""
_OWNED = {"enable.auto.commit", "enable.auto.offset.store", "on_commit", "error_cb"}
_Handed = list[Message] | tuple[Callable[..., None], tuple[Any, ...]]
"""What the consumer's thread hands the loop: a batch, or a partition change (a call and its arguments)."""


class AsyncConsumer:
    """Consumes ``topics`` on a dedicated thread and hands records to the event loop in batches.

    Mark each record ``done`` once its outcome is durable; the consumer commits, per partition, the highest offset
    below which every record is done, periodically, before a partition is revoked, and at stop. A partition with
    ``max_pending`` records not yet done is paused (the thread keeps polling, so the group keeps its member).

    >>> async with AsyncConsumer({"bootstrap.servers": b, "group.id": "g"}, ["orders"]) as consumer:  # doctest: +SKIP
    ...     async for record in consumer:
    ...         await handle(record)
    ...         consumer.done(record)
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        commit_mode: CommitMode = CommitMode.TRACKED,
        batch_size: int = 500,
        poll_timeout: float = 0.05,
        max_pending: int = 5000,
        commit_interval: float = 1.0,
        revoke_timeout: float = 15.0,
        connect_timeout: float = 15.0,
        on_assign: Callable[[list[TP]], None] | None = None,
        on_revoke: Callable[[list[TP]], None] | None = None,
    ) -> None:
        if "group.id" not in config:
            raise ConfigError("consumer setting 'group.id' is missing: name the consumer group")
        if not topics:
            raise ConfigError("no topics to consume: give at least one topic")
        clash = _OWNED & set(config)
        if clash:
            raise ConfigError(f"consumer settings {sorted(clash)} are managed by kafka-dlq: remove them")
        self._config = {**_DEFAULTS, **config}
        self.topics = list(topics)
        self.commit_mode = commit_mode
        self._batch_size = batch_size
        self._poll_timeout = poll_timeout
        self._max_pending = max_pending
        self._commit_interval = commit_interval
        self._revoke_timeout = revoke_timeout
        self._connect_timeout = connect_timeout
        self._on_assign_cb = on_assign
        self._on_revoke_cb = on_revoke
        self.state = ClientState.NEW
        self._thread: ClientThread[Consumer] | None = None
        # The thread only waits on librdkafka and hands raw batches over; every step per record (building it,
        # tracking its offset, marking it done) runs on the loop. Python threads take turns at the GIL, so work
        # per record on the consumer's thread would stall the loop (and the producer's thread) in small slices.
        # The PartitionOffsets objects are shared: the loop writes them, the thread reads watermarks and counts.
        # Loop side.
        self._loop_thread: int | None = None
        self._buffer: deque[KafkaRecord] = deque()
        self._incoming: deque[list[Message]] = deque()  # batches handed over, not yet built into records
        # What the thread has put down for the loop, in the order it happened: batches, and partition changes (a
        # call and its arguments); and whether the loop has been woken to pick them up: the thread wakes it once,
        # not once per batch, while it is busy (see _hand_over).
        self._handover: deque[_Handed] = deque()
        self._wake_pending = False
        self._incoming_at = 0  # how far into the first incoming batch the records are built
        self._taking = False  # a slice of the incoming batches is scheduled
        self._arrived = asyncio.Event()
        self._error: KafkaClientError | ConfigError | None = None
        self._current: dict[TP, int] = {}  # assigned partition -> generation, as the loop knows it
        self._offsets: dict[TP, PartitionOffsets] = {}  # includes partitions being revoked, until committed
        self._maybe_stale = False  # the buffer may hold records of an older generation (after a rewind)
        self._received = 0  # records the loop has received from the thread
        self._moves = 0  # watermark moves, counted by the loop; the thread commits when it changes
        # Thread side.
        self._tracked: dict[TP, PartitionOffsets] = {}
        self._paused: set[TP] = set()
        self._generation = 0
        self._handed = 0  # records handed to the loop
        self._taken = threading.Event()  # the loop took records from its buffer
        self._backlog_limit = 4 * batch_size
        self._seen_moves = 0
        self._dirty = False
        self._last_commit = 0.0
        self._closing = False
        self._quiet = QuietErrors(f"consumer {self.group_id}")

    @property
    def group_id(self) -> str:
        return str(self._config["group.id"])

    # ---------------------------------------------------------------- lifecycle (loop)

    async def start(self) -> None:
        """Connect, check the topics exist, subscribe. Raises BrokerUnreachableError / TopicNotFoundError."""
        if self.state is not ClientState.NEW:
            raise ClientClosedError(f"this consumer is {self.state.value}; a consumer starts once: create a new one")
        self.state = ClientState.STARTING
        self._loop_thread = threading.get_ident()
        self._thread = ClientThread(
            f"kafka-dlq-consumer-{self.group_id}", asyncio.get_running_loop(), self._create, self._serve, self._close
        )
        self._thread.start()
        try:
            await self._thread.started
        except BaseException:
            self.state = ClientState.CLOSED
            await asyncio.shield(self._thread.finished)
            raise
        self.state = ClientState.RUNNING
        self._thread.finished.add_done_callback(self._thread_finished)

    def _thread_finished(self, finished: asyncio.Future[None]) -> None:
        """The consumer's thread ended. Asked to (stop): nothing to do. On its own (a fatal error, a bug): the
        consumer is closed, and the application hears it from ``getmany`` instead of waiting for records forever."""
        if self.state in (ClientState.STOPPING, ClientState.CLOSED):
            return
        error = None if finished.cancelled() else finished.exception()
        self.state = ClientState.CLOSED
        if isinstance(error, KafkaClientError | ConfigError):
            self._error = error
        else:
            self._error = KafkaClientError(
                f"consumer {self.group_id}: its thread stopped unexpectedly ({error!r}); create a new consumer",
                fatal=True,
            )
        self._arrived.set()

    async def stop(self, timeout: float = 30.0) -> None:
        """Commit what is done and leave the group, within ``timeout`` seconds; never blocks the loop."""
        if self.state in (ClientState.NEW, ClientState.CLOSED):
            self.state = ClientState.CLOSED
            return
        self.state = ClientState.STOPPING
        thread = self._thread
        assert thread is not None
        thread.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(thread.finished), timeout)
        except TimeoutError:
            log.error("consumer %s did not close within %.0f s; leaving its thread behind", self.group_id, timeout)
        except Exception as exc:  # the thread ended with an error (fatal, or a bug): stopping still completes
            log.warning("consumer %s closed with an error: %s", self.group_id, exc)
        finally:
            self.state = ClientState.CLOSED
            self._arrived.set()

    async def __aenter__(self) -> AsyncConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- records (loop)

    async def getmany(self, max_records: int = 500, timeout: float = 1.0) -> list[KafkaRecord]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for the first; [] when none came."""
        if not self._buffer and self._error is None and self.state is ClientState.RUNNING:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        if self._error is not None:
            error = self._error
            if not (isinstance(error, KafkaClientError) and error.fatal):
                self._error = None  # a fatal error stays: the consumer is unusable, every later call says so
            raise error
        if self.state is ClientState.CLOSED and not self._buffer:
            self._take_all()  # what the thread handed over before it stopped
            if not self._buffer:
                raise ClientClosedError("the consumer is stopped")
        buffer = self._buffer
        if buffer:
            self._taken.set()  # the thread may be waiting for room to hand over more
        if not self._maybe_stale:
            # Every buffered record is current (revoked partitions' records leave the buffer at once).
            if len(buffer) <= max_records:
                out = list(buffer)
                buffer.clear()
            else:
                out = [buffer.popleft() for _ in range(max_records)]
            return out
        out = []
        current = self._current
        while buffer and len(out) < max_records:
            record = buffer.popleft()
            if current.get((record.topic, record.partition)) == record.generation:
                out.append(record)
        if not buffer:
            self._maybe_stale = False
        return out

    async def __aiter__(self) -> AsyncIterator[KafkaRecord]:
        while self.state is ClientState.RUNNING or self._buffer or self._incoming or self._handover:
            for record in await self.getmany():
                yield record

    def done(self, record: KafkaRecord) -> None:
        """Mark ``record`` done: its outcome is durable. Records may be marked in any order, from any thread."""
        self.done_many((record,))

    def done_many(self, records: Iterable[KafkaRecord]) -> None:
        """Mark ``records`` done (``done`` for each, in one step)."""
        if threading.get_ident() != self._loop_thread:
            # The offsets are the loop's to change; from another thread, the mark goes through the loop.
            if self._thread is not None:
                self._thread.call_on_loop(self.done_many, list(records))
            return
        offsets_of, moved = self._offsets, False
        key: tuple[str, int, int] | None = None
        run: list[int] = []
        for record in records:
            # Batches come grouped by partition: one done_many per run of records of one partition.
            this = (record.topic, record.partition, record.generation)
            if this != key:
                if run and key is not None:
                    moved |= self._done_run(offsets_of, key, run)
                key, run = this, []
            run.append(record.offset)
        if run and key is not None:
            moved |= self._done_run(offsets_of, key, run)
        if moved and self.commit_mode is CommitMode.TRACKED:
            self._moves += 1

    def release(self, record: KafkaRecord) -> None:
        """Hand ``record`` back unprocessed: it is no longer waited for (at a revoke, by the pause for
        ``max_pending``), and the commit never passes it, so it is read again by its partition's next owner."""
        self.release_many((record,))

    def release_many(self, records: Iterable[KafkaRecord]) -> None:
        """``release`` for each of ``records``, in one step."""
        if threading.get_ident() != self._loop_thread:
            # The offsets are the loop's to change; from another thread, the release goes through the loop.
            if self._thread is not None:
                self._thread.call_on_loop(self.release_many, list(records))
            return
        for record in records:
            held = self._offsets.get((record.topic, record.partition))
            if held is not None and held.generation == record.generation:
                held.release(record.offset)

    @staticmethod
    def _done_run(offsets_of: dict[TP, PartitionOffsets], key: tuple[str, int, int], run: list[int]) -> bool:
        offsets = offsets_of.get((key[0], key[1]))
        if offsets is None or offsets.generation != key[2]:
            return False  # a record of an assignment that is gone: its partition is no longer ours
        moved = offsets.done_many(run)
        # Done records above a gap change the commit too: its metadata names them (see offsets.encode_done).
        return moved or bool(offsets.watermark is None or run[-1] > offsets.watermark)

    async def commit(self) -> list[TopicPartition]:
        """Commit the done watermarks now (synchronously on the consumer's thread); returns what was committed."""
        return await self._call(lambda consumer: self._commit_sync(consumer, list(self._tracked)))

    async def committed(self, timeout: float = 10.0) -> list[TopicPartition]:
        """The group's committed offsets for the current assignment."""
        return await self._call(lambda consumer: consumer.committed(consumer.assignment(), timeout=timeout))

    async def assignment(self) -> list[TP]:
        return await self._call(lambda consumer: [(tp.topic, tp.partition) for tp in consumer.assignment()])

    async def group_metadata(self) -> Any:
        """The consumer's group metadata, for ``TransactionalProducer.send_offsets``."""
        return await self._call(lambda consumer: consumer.consumer_group_metadata())

    async def rewind(self) -> None:
        """Go back to the committed offsets of every assigned partition (after an aborted transaction).

        Records read but not committed are dropped from the buffer and will be read again.
        """
        await self._call(self._rewind)

    def _call(self, command: Callable[[Consumer], R]) -> asyncio.Future[R]:
        if self._thread is None or self.state is not ClientState.RUNNING:
            raise ClientClosedError(f"the consumer is {self.state.value}")
        return self._thread.call(command)

    # ---------------------------------------------------------------- loop-side callbacks from the thread

    def _on_batches(self) -> None:
        """Batches from the thread: queued, then taken in slices of ``_SLICE`` records, one slice per loop turn."""
        self._wake_pending = False  # first: a batch put down from now on wakes the loop again
        self._pick_up()
        if self._incoming and not self._taking:
            self._taking = True
            self._take_slice()

    def _pick_up(self) -> None:
        """Take what the thread put down, in order: a partition change applies once the batches read before it are
        built (under the assignment they were read in), and before those read after it."""
        handover, incoming = self._handover, self._incoming
        while handover:
            item = handover.popleft()
            if isinstance(item, list):
                incoming.append(item)
            else:
                self._build_incoming()
                call, args = item
                call(*args)

    def _take_slice(self) -> None:
        """Build the records of the next ``_SLICE`` messages; the rest wait for the next turn of the loop."""
        self._pick_up()
        if self._incoming:
            self._take(_SLICE)
        if self._incoming:
            asyncio.get_running_loop().call_soon(self._take_slice)
        else:
            self._taking = False

    def _take_all(self) -> None:
        """Take and build everything the thread has handed over so far."""
        self._pick_up()
        self._build_incoming()

    def _build_incoming(self) -> None:
        while self._incoming:
            self._take(len(self._incoming[0]))

    def _take(self, limit: int) -> None:
        """Build the records of up to ``limit`` messages of the first incoming batch."""
        incoming = self._incoming
        messages = incoming[0]
        start = self._incoming_at
        end = start + limit
        if end >= len(messages):
            incoming.popleft()
            self._incoming_at = 0
            if start:
                messages = messages[start:]
        else:
            self._incoming_at = end
            messages = messages[start:end]
        self._take_messages(messages)

    def _take_messages(self, messages: list[Message]) -> None:
        self._received += len(messages)
        current, offsets_of, append = self._current, self._offsets, self._buffer.append
        last: TP | None = None
        offsets: PartitionOffsets | None = None
        run: list[int] = []  # offsets of the current run of one partition's records: tracked in one call
        skipped: list[tuple[PartitionOffsets, int]] = []
        generation = 0
        for msg in messages:
            error = msg.error()
            if error is not None:
                self._message_error(error)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            tp = (topic, partition)
            if tp != last:
                if offsets is not None and run:
                    offsets.delivered_many(run)
                run = []
                last, offsets = tp, offsets_of.get(tp)
                generation = current.get(tp, -1)
                if offsets is not None and offsets.generation != generation:
                    offsets = None  # revoked (or being revoked): not ours any more
            if offsets is None:
                continue  # a late record of a partition we no longer own
            run.append(offset)
            if offsets.skip and offset in offsets.skip:
                # Finished by a previous owner, out of order (the committed metadata says so): done, not again.
                offsets.skip.discard(offset)
                skipped.append((offsets, offset))
                continue
            ts_type, ts = msg.timestamp()
            headers = msg.headers()
            append(
                record_from_wire(
                    topic,
                    partition,
                    offset,
                    None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                    msg.key(),
                    msg.value(),
                    tuple(headers) if headers else (),  # type: ignore[arg-type]
                    generation,
                )
            )
        if offsets is not None and run:
            offsets.delivered_many(run)
        for owner, offset in skipped:
            owner.done(offset)
        # A waiting getmany wakes once the whole handover is built (or a batch's worth of it is): it gets the batch
        # at once, as it would without slices.
        if self._buffer and (not self._incoming or len(self._buffer) >= self._batch_size):
            self._arrived.set()

    def _on_error(self, error: KafkaClientError | ConfigError) -> None:
        self._error = error
        self._arrived.set()

    def _on_partitions(self, assigned: dict[TP, PartitionOffsets], revoked: list[TP]) -> None:
        """A partition change, from the thread through the handover (see _pick_up)."""
        for tp in revoked:
            self._current.pop(tp, None)
        for tp, offsets in assigned.items():
            self._current[tp] = offsets.generation
            self._offsets[tp] = offsets
        if assigned and self._buffer:
            self._maybe_stale = True  # a rewind: buffered records of the old generation are not handed out
        if revoked:
            # Records of a revoked partition that the application has not taken go back, unprocessed.
            keep: deque[KafkaRecord] = deque()
            gone = set(revoked)
            for record in self._buffer:
                tp = (record.topic, record.partition)
                if tp in gone:
                    held = self._offsets.get(tp)
                    if held is not None and held.generation == record.generation:
                        held.release(record.offset)
                else:
                    keep.append(record)
            self._buffer = keep
            if self._on_revoke_cb:
                self._on_revoke_cb(revoked)
        if assigned and self._on_assign_cb:
            self._on_assign_cb(list(assigned))

    def _forget(self, gone: dict[TP, PartitionOffsets]) -> None:
        """After a revoke's commit (or a loss): marks for these partitions no longer count."""
        for tp, offsets in gone.items():
            if self._offsets.get(tp) is offsets:  # not if the partition has been assigned again meanwhile
                del self._offsets[tp]

    # ---------------------------------------------------------------- the consumer's thread

    def _create(self) -> Consumer:
        config = {
            "logger": librdkafka_log,
            **self._config,
            "on_commit": self._on_commit,
            "error_cb": self._on_client_error,
        }
        try:
            consumer = Consumer(config)
        except KafkaException as exc:
            raise translate(exc, "invalid consumer settings") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid consumer settings: {exc}") from None
        try:
            metadata = consumer.list_topics(timeout=self._connect_timeout)
            missing = [t for t in self.topics if not t.startswith("^") and t not in metadata.topics]
            missing += [t for t in self.topics if t in metadata.topics and metadata.topics[t].error is not None]
            if missing:
                raise TopicNotFoundError(
                    f"topic(s) {', '.join(sorted(set(missing)))} do not exist on {self._config['bootstrap.servers']}:"
                    " create them or fix the names"
                )
            consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)
        except KafkaException as exc:
            consumer.close()
            raise translate(exc, f"consumer could not reach {self._config.get('bootstrap.servers')}") from None
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _serve(self, consumer: Consumer) -> None:
        self._backpressure(consumer)
        self._taken.clear()
        if self._handed - self._received + len(self._buffer) >= self._backlog_limit:
            # The loop has not caught up with what it was handed: leave the records in librdkafka's queue
            # (it keeps fetching ahead) until it takes some. consume(1, 0) still serves rebalances and keeps
            # the group membership; pausing instead would make librdkafka drop what it fetched and fetch it again.
            self._taken.wait(self._poll_timeout)
            messages = consumer.consume(1, 0)
        else:
            messages = consumer.consume(min(self._batch_size, _CONSUME_AT_MOST), self._poll_timeout)
        if messages:
            self._handed += len(messages)
            self._hand_over(messages)
        if self._moves != self._seen_moves:
            self._seen_moves = self._moves
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_commit >= self._commit_interval:
            self._commit_async(consumer)

    def _hand_over(self, item: _Handed) -> None:
        # Put the batch down, and wake the loop only if no wake-up is on its way: while the loop is busy, the
        # batches that follow ride on the one already queued. A wake-up writes to the loop's self-pipe, and that
        # write lets go of the GIL: this thread would then wait to take it back (up to the 5 ms switch interval)
        # while the loop runs, and every GIL release on the loop (one per delivery report in the producer's
        # poll) would wake it in vain. One GIL take per batch instead of two. The loop clears the flag before it
        # picks up, so a batch put down after its pick-up always wakes it again. A partition change goes down the
        # same way (_post), so the loop applies it between the batches read before it and those read after it,
        # whichever wake-up picks them up.
        self._handover.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            assert self._thread is not None
            self._thread.call_on_loop(self._on_batches)

    def _post(self, call: Callable[..., None], *args: Any) -> None:
        """On the thread: have the loop run ``call(*args)`` in order with the batches handed over."""
        self._hand_over((call, args))

    def _message_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        translated = translate(error, "consume")
        if error.fatal() or isinstance(translated, TopicNotFoundError):
            self._on_error(translated)
        else:
            log.warning("consumer %s: %s", self.group_id, translated)

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            assert self._thread is not None
            self._thread.call_on_loop(self._on_error, translate(error, "consumer"))
        else:  # librdkafka retries these itself (broker down, connection reset ...)
            self._quiet(error.str())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            log.warning("consumer %s: commit failed (%s); the next commit covers it", self.group_id, error.str())
            self._dirty = True

    def _backpressure(self, consumer: Consumer) -> None:
        limit = self._max_pending
        pause, resume = [], []
        for tp, offsets in self._tracked.items():
            pending = len(offsets.pending)
            if tp in self._paused:
                if pending <= limit // 2:
                    resume.append(tp)
            elif pending >= limit:
                pause.append(tp)
        if pause:
            consumer.pause([TopicPartition(t, p) for t, p in pause])
            self._paused.update(pause)
        if resume:
            consumer.resume([TopicPartition(t, p) for t, p in resume])
            self._paused.difference_update(resume)

    def _watermarks(self, partitions: Iterable[TP]) -> list[TopicPartition]:
        out = []
        for tp in partitions:
            offsets = self._tracked.get(tp)
            point = None if offsets is None else offsets.commit_point()
            if point is not None:
                out.append(TopicPartition(tp[0], tp[1], point[0], metadata=point[1]))
        return out

    def _commit_async(self, consumer: Consumer) -> None:
        self._last_commit = time.monotonic()
        self._dirty = False
        offsets = self._watermarks(self._tracked)
        if offsets and self.commit_mode is CommitMode.TRACKED:
            consumer.commit(offsets=offsets, asynchronous=True)

    def _commit_sync(self, consumer: Consumer, partitions: list[TP]) -> list[TopicPartition]:
        offsets = self._watermarks(partitions)
        if not offsets or self.commit_mode is not CommitMode.TRACKED:
            return []
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET:
                return []
            raise translate(exc, "commit") from None
        return offsets

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        assigned = {}
        done_before = self._done_before(consumer, partitions)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            assigned[key] = self._tracked[key] = PartitionOffsets(self._generation, done_before.get(key))
            self._paused.discard(key)
        self._post(self._on_partitions, assigned, [])

    def _done_before(self, consumer: Consumer, partitions: list[TopicPartition]) -> dict[TP, set[int]]:
        """Per partition, the offsets above the committed one that the previous owner had finished."""
        if self.commit_mode is not CommitMode.TRACKED or not partitions:
            return {}
        try:
            committed = consumer.committed(partitions, timeout=self._connect_timeout)
        except KafkaException as exc:  # only an optimisation: without it those records are read again
            log.warning("consumer %s: could not read committed offsets at assignment: %s", self.group_id, exc)
            return {}
        out = {}
        for tp in committed:
            if tp.offset >= 0 and tp.metadata:
                done = decode_done(tp.offset, tp.metadata)
                if done:
                    out[(tp.topic, tp.partition)] = done
        return out

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Before the partitions go: let in-progress records finish (bounded), then commit what is done."""
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        self._post(self._on_partitions, {}, revoked)
        deadline = time.monotonic() + (min(self._revoke_timeout, 2.0) if self._closing else self._revoke_timeout)
        while time.monotonic() < deadline:
            # The loop marks records done (and releases the ones it had not handed out) on these same objects.
            if not any(self._tracked[tp].pending for tp in revoked if tp in self._tracked):
                break
            time.sleep(0.005)
        else:
            waiting = sum(len(self._tracked[tp].pending) for tp in revoked if tp in self._tracked)
            log.warning(
                "consumer %s: %d records still in progress at revoke; they will be read again", self.group_id, waiting
            )
        try:
            self._commit_sync(consumer, revoked)
        except KafkaClientError as exc:
            log.warning("consumer %s: commit at revoke failed: %s", self.group_id, exc)
        gone = {tp: self._tracked.pop(tp) for tp in revoked if tp in self._tracked}
        self._paused.difference_update(revoked)
        self._post(self._forget, gone)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost partitions (session timed out) cannot be committed: forget them; their records come again."""
        lost = [(tp.topic, tp.partition) for tp in partitions]
        self._post(self._on_partitions, {}, lost)
        gone = {tp: self._tracked.pop(tp) for tp in lost if tp in self._tracked}
        self._paused.difference_update(lost)
        self._post(self._forget, gone)

    def _rewind(self, consumer: Consumer) -> None:
        assignment = consumer.assignment()
        committed = consumer.committed(assignment, timeout=30)
        self._generation += 1
        assigned = {}
        for tp in committed:
            key = (tp.topic, tp.partition)
            assigned[key] = self._tracked[key] = PartitionOffsets(self._generation)
            offset = tp.offset if tp.offset >= 0 else _reset_offset(self._config.get("auto.offset.reset"))
            consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        self._post(self._on_partitions, assigned, [])

    def _close(self, consumer: Consumer) -> None:
        self._closing = True
        try:
            self._commit_sync(consumer, list(self._tracked))
        except KafkaClientError as exc:
            log.warning("consumer %s: commit at close failed: %s", self.group_id, exc)
        consumer.close()


def _reset_offset(policy: object) -> int:
    return OFFSET_END if policy in ("latest", "largest", "end") else OFFSET_BEGINNING
