"""Read topics from chosen offsets up to where they ended when reading started: no consumer group, no commits.

For operator tools (``stats``, ``peek``): a read has a known end, so it finishes, and it leaves no trace on the
cluster. Partitions are assigned explicitly; the end of each is the high watermark captured by ``start()``
(records produced later are not read), reached when its last record arrives or librdkafka reports the end of the
partition (a transaction marker or a compacted tail can hide the last offsets).

Two ways to read, both on the reader's own thread (librdkafka is never called from the loop):

- ``async for batch in reader.batches(...)``: lists of records handed to the loop, one batch per await, so the
  loop sets the pace and nothing piles up in memory;
- ``await reader.fold(step, ...)``: ``step(batch)`` runs on the reader's thread for every batch, for aggregation
  that should leave no Python object per record behind and cost the loop nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, TopicPartition

from kafka_dlq.errors import ClientClosedError, ConfigError, KafkaClientError, TopicNotFoundError
from kafka_dlq.kafka._thread import ClientState, ClientThread, QuietErrors, librdkafka_log, translate
from kafka_dlq.kafka.record import KafkaRecord, record_from_wire

__all__ = ["TopicReader", "Watermarks"]

R = TypeVar("R")
TP = tuple[str, int]

_DEFAULTS: dict[str, Any] = {
    # A group id is required by the client, but without subscribe() or commits no group exists on the cluster.
    "group.id": "kafka-dlq-reader",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    # Records deleted by retention while being read: go on from the new start (the default jumps to the end).
    "auto.offset.reset": "earliest",
    # Large fetches: the reader wants whole partitions, fast, and librdkafka fetches values regardless.
    "max.partition.fetch.bytes": 16 * 1024 * 1024,
    "fetch.max.bytes": 64 * 1024 * 1024,
    # The broker holds an empty fetch this long; the end of a partition is only seen after one, so keep it short.
    "fetch.wait.max.ms": 50,
}
_OWNED = {"enable.partition.eof", "error_cb"}


@dataclass(frozen=True, slots=True)
class Watermarks:
    """A partition's offsets when reading started: ``low`` is its first record, ``high`` one past its last."""

    low: int
    high: int

    @property
    def span(self) -> int:
        """``high - low``: the records in between (fewer where transaction markers or compaction took offsets)."""
        return self.high - self.low


class _Scan:
    """One read: for each partition still being read, the offset where it ends (exclusive)."""

    __slots__ = ("ends", "last_progress", "read", "values")

    def __init__(self, ends: dict[TP, int], values: bool) -> None:
        self.ends = ends
        self.values = values
        self.read = 0
        self.last_progress = time.monotonic()


class TopicReader:
    """Reads partitions of ``topics`` from given offsets to their high watermarks at ``start()``.

    >>> async with TopicReader({"bootstrap.servers": b}, ["orders.dlq"]) as reader:   # doctest: +SKIP
    ...     print(reader.watermarks)            # {("orders.dlq", 0): Watermarks(low=0, high=1200), ...}
    ...     async for batch in reader.batches(values=False):
    ...         for record in batch:            # KafkaRecord; value None when values=False
    ...             print(record.offset, record.header("dlq.error.class"))

    Aggregating on the reader's thread (``step`` must not touch the loop or its objects):

    >>> counts = collections.Counter()                                                 # doctest: +SKIP
    >>> total = await reader.fold(lambda batch: counts.update(r.key for r in batch))

    ``start`` (for both) maps partitions to their first offset and reads only those; without it, every partition
    from its low watermark. ``end`` maps partitions to an offset to stop before (at most the high watermark).
    A read may be repeated; each one reassigns. ``values=False`` leaves values in librdkafka (``value`` is None):
    the fast path when only headers, keys and metadata matter.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        batch_size: int = 10_000,
        connect_timeout: float = 15.0,
        idle_timeout: float = 30.0,
    ) -> None:
        if "bootstrap.servers" not in config:
            raise ConfigError("reader setting 'bootstrap.servers' is missing: name the brokers")
        if not topics:
            raise ConfigError("no topics to read: give at least one topic")
        clash = _OWNED & set(config)
        if clash:
            raise ConfigError(f"reader settings {sorted(clash)} are managed by kafka-dlq: remove them")
        self._config = {**_DEFAULTS, **config}
        self.topics = list(dict.fromkeys(topics))
        self._batch_size = batch_size
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self.state = ClientState.NEW
        self.watermarks: dict[TP, Watermarks] = {}
        """Per partition, its offsets when ``start()`` ran; reads stop at ``high``."""
        self._thread: ClientThread[Consumer] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()  # a read in progress on the thread ends at its next batch
        self._quiet = QuietErrors("reader")

    # ---------------------------------------------------------------- lifecycle (loop)

    async def start(self) -> None:
        """Connect, check the topics exist and capture every partition's watermarks.

        Raises ``TopicNotFoundError`` or ``BrokerUnreachableError``.
        """
        if self.state is not ClientState.NEW:
            raise ClientClosedError(f"this reader is {self.state.value}; a reader starts once: create a new one")
        self.state = ClientState.STARTING
        self._thread = ClientThread(
            "kafka-dlq-reader", asyncio.get_running_loop(), self._create, self._idle, self._close
        )
        self._thread.start()
        try:
            await self._thread.started
            self.watermarks = await self._thread.call(self._lookup)
        except BaseException:
            self.state = ClientState.CLOSED
            self._thread.request_stop()
            self._wake.set()
            await asyncio.shield(self._thread.finished)
            raise
        self.state = ClientState.RUNNING

    async def stop(self, timeout: float = 30.0) -> None:
        """Close the client (on its thread), within ``timeout`` seconds."""
        if self.state in (ClientState.NEW, ClientState.CLOSED):
            self.state = ClientState.CLOSED
            return
        self.state = ClientState.STOPPING
        assert self._thread is not None
        self._stopping.set()
        self._thread.request_stop()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._thread.finished), timeout)
        except TimeoutError:
            pass  # a daemon thread: it goes with the process
        except KafkaClientError:
            pass  # closing a reader loses nothing
        finally:
            self.state = ClientState.CLOSED

    async def __aenter__(self) -> TopicReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- reading (loop)

    @property
    def partitions(self) -> list[TP]:
        """Every partition of the reader's topics, in topic then partition order."""
        return sorted(self.watermarks)

    async def batches(
        self,
        start: Mapping[TP, int] | None = None,
        *,
        end: Mapping[TP, int] | None = None,
        values: bool = True,
    ) -> AsyncIterator[list[KafkaRecord]]:
        """Batches of records up to the end of each partition read; partitions interleave, offsets ascend in each."""
        scan = await self._call(lambda consumer: self._assign(consumer, start, end, values))
        try:
            while True:
                batch = await self._call(lambda consumer: self._next_batch(consumer, scan))
                if batch is None:
                    return
                yield batch
        finally:
            if scan.ends and self.state is ClientState.RUNNING:
                with contextlib.suppress(ClientClosedError):
                    await self._call(self._unassign)  # stopped early: stop fetching too

    async def fold(
        self,
        step: Callable[[list[KafkaRecord]], object],
        start: Mapping[TP, int] | None = None,
        *,
        end: Mapping[TP, int] | None = None,
        values: bool = True,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Call ``step(batch)`` on the reader's thread for every batch; returns the records read.

        ``progress(records_so_far)`` is called on the loop after each batch (for a progress bar).
        """

        def run(consumer: Consumer) -> int:
            scan = self._assign(consumer, start, end, values)
            thread = self._thread
            assert thread is not None
            while (batch := self._next_batch(consumer, scan)) is not None:
                step(batch)
                if progress is not None:
                    thread.call_on_loop(progress, scan.read)
            return scan.read

        return await self._call(run)

    async def offsets_for_time(self, timestamp_ms: int, timeout: float = 10.0) -> dict[TP, int]:
        """Per partition, the offset of the first record at or after ``timestamp_ms`` (``high`` when none is)."""

        def lookup(consumer: Consumer) -> dict[TP, int]:
            asked = [TopicPartition(t, p, timestamp_ms) for t, p in self.partitions]
            try:
                found = consumer.offsets_for_times(asked, timeout=timeout)
            except KafkaException as exc:
                raise translate(exc, "offsets for time") from None
            out = {}
            for tp in found:
                key = (tp.topic, tp.partition)
                out[key] = tp.offset if tp.offset >= 0 else self.watermarks[key].high
            return out

        return await self._call(lookup)

    def _call(self, command: Callable[[Consumer], R]) -> asyncio.Future[R]:
        if self._thread is None or self.state is not ClientState.RUNNING:
            raise ClientClosedError(f"the reader is {self.state.value}")
        future = self._thread.call(command)
        self._wake.set()
        return future

    # ---------------------------------------------------------------- the reader's thread

    def _create(self) -> Consumer:
        config = {
            "logger": librdkafka_log,
            **self._config,
            "enable.partition.eof": True,
            "error_cb": self._on_client_error,
        }
        try:
            return Consumer(config)
        except KafkaException as exc:
            raise translate(exc, "invalid reader settings") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid reader settings: {exc}") from None

    def _idle(self, consumer: Consumer) -> None:
        # Between reads there is nothing to serve (no group, no commits): sleep until a command comes.
        self._wake.wait(0.5)
        self._wake.clear()

    def _close(self, consumer: Consumer) -> None:
        consumer.close()

    def _on_client_error(self, error: KafkaError) -> None:
        self._quiet(error.str())  # librdkafka retries these itself; a read that cannot progress times out

    def _lookup(self, consumer: Consumer) -> dict[TP, Watermarks]:
        servers = self._config["bootstrap.servers"]
        try:
            metadata = consumer.list_topics(timeout=self._connect_timeout)
        except KafkaException as exc:
            raise translate(exc, f"reader could not reach {servers}") from None
        missing = [t for t in self.topics if t not in metadata.topics or metadata.topics[t].error is not None]
        if missing:
            raise TopicNotFoundError(
                f"topic(s) {', '.join(sorted(missing))} do not exist on {servers}: create them or fix the names"
            )
        out = {}
        for topic in self.topics:
            for partition in sorted(metadata.topics[topic].partitions):
                try:
                    low, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=self._connect_timeout, cached=False
                    )
                except KafkaException as exc:
                    raise translate(exc, f"watermarks of {topic}/{partition}") from None
                out[(topic, partition)] = Watermarks(low, high)
        return out

    def _assign(
        self, consumer: Consumer, start: Mapping[TP, int] | None, end: Mapping[TP, int] | None, values: bool
    ) -> _Scan:
        chosen: Iterable[TP] = self.partitions if start is None else start
        unknown = [tp for tp in chosen if tp not in self.watermarks]
        if unknown:
            raise ConfigError(f"partitions {unknown} are not in the reader's topics {self.topics}")
        ends: dict[TP, int] = {}
        assignment = []
        for tp in chosen:
            marks = self.watermarks[tp]
            first = min(max(marks.low if start is None else start[tp], marks.low), marks.high)
            stop = marks.high if end is None or tp not in end else min(max(end[tp], first), marks.high)
            if first < stop:  # an empty range is read at once: assigning it would only wait for an end event
                ends[tp] = stop
                assignment.append(TopicPartition(tp[0], tp[1], first))
        consumer.assign(assignment)
        if assignment:
            consumer.resume(assignment)  # librdkafka keeps a partition paused (by an earlier read) across assigns
        return _Scan(ends, values)

    def _unassign(self, consumer: Consumer) -> None:
        consumer.unassign()

    def _next_batch(self, consumer: Consumer, scan: _Scan) -> list[KafkaRecord] | None:
        """The next records of the scan; None once every partition reached its end."""
        while scan.ends:
            if self._stopping.is_set():
                consumer.unassign()
                raise ClientClosedError("the reader was stopped during a read")
            messages = consumer.consume(self._batch_size, 0.1)
            records = self._convert(consumer, messages, scan)
            if records:
                return records
            if messages:
                continue
            if time.monotonic() - scan.last_progress > self._idle_timeout:
                short = ", ".join(f"{t}/{p}" for t, p in sorted(scan.ends))
                consumer.unassign()
                raise KafkaClientError(
                    f"reading stalled: nothing arrived for {self._idle_timeout:.0f} s from {short}, which are not "
                    "read to their end: check that the brokers are up and the partitions have a leader",
                    retriable=True,
                )
        consumer.unassign()
        return None

    def _convert(self, consumer: Consumer, messages: list[Any], scan: _Scan) -> list[KafkaRecord]:
        # The hot loop: one pass, and per record nothing beyond building it (messages come in runs of one
        # partition, so its end is looked up once per run). Messages are Any here: confluent-kafka types their
        # topic, partition and offset Optional, which they are only for client events, never for a record.
        out: list[KafkaRecord] = []
        append = out.append
        ends, values = scan.ends, scan.values
        finished: list[TP] = []
        last: Any = None
        stop: int | None = None
        for msg in messages:
            topic, partition = msg.topic(), msg.partition()
            if last is None or partition != last[1] or topic != last[0]:
                last = (topic, partition)
                stop = ends.get(last)
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    # The end as the broker sees it now (under read_committed, where an open transaction
                    # starts): nothing further can be read.
                    if ends.pop(last, None) is not None:
                        finished.append(last)
                    stop = None
                    continue
                raise translate(error, f"reading {topic}/{partition}")
            offset = msg.offset()
            if stop is None or offset >= stop:
                continue  # past the captured end (produced since), or a partition already finished
            if offset >= stop - 1:
                del ends[last]
                finished.append(last)
                stop = None
            ts_type, ts = msg.timestamp()
            headers = msg.headers()
            append(
                record_from_wire(
                    topic,
                    partition,
                    offset,
                    None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                    msg.key(),
                    msg.value() if values else None,
                    tuple(headers) if headers else (),
                    0,
                )
            )
        if finished:
            # Finished partitions stop fetching (new records may keep arriving there).
            consumer.pause([TopicPartition(t, p) for t, p in finished])
        if out or finished:
            scan.last_progress = time.monotonic()
        scan.read += len(out)
        return out
