"""An in-memory stand-in for :class:`~kafka_dlq.retrying.RetryingConsumer`, for unit tests of your handlers.

It runs the very engine the Kafka-backed consumer runs (:class:`~kafka_dlq.retrying.RetryEngine`: concurrency,
ordering, classification, in-place retry, the dead letter and its headers), with no broker: records are handed
to it directly, dead letters are kept in lists, and backoffs are recorded instead of waited for, so a test of a
handler that retries runs in milliseconds. It is for testing *your handler's* behaviour under kafka-dlq; the Kafka
side is tested against a real broker.

>>> async def handle(record: KafkaRecord) -> None:                  # doctest: +SKIP
...     order = json.loads(record.value)
...     if "id" not in order:
...         raise KeyError("id")
>>> consumer = MemoryRetryingConsumer(handle, classifier=Classifier(non_retryable=[KeyError]))  # doctest: +SKIP
>>> async with consumer:                                             # doctest: +SKIP
...     await consumer.deliver("orders", b'{"total": 3}', key=b"o-1")
>>> consumer.dead_letters[0].failure.error_class                     # doctest: +SKIP
'builtins.KeyError'
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from kafka_dlq.classify import Classifier
from kafka_dlq.errors import ClientClosedError, KafkaDLQError
from kafka_dlq.formats import EncodedRecord, decode
from kafka_dlq.kafka.offsets import PartitionOffsets
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.policy import RetryPolicy
from kafka_dlq.records import DeadLetter
from kafka_dlq.retrying import Ordering, RecordHandler, RetryEngine

__all__ = ["MemoryRetryingConsumer", "StandInError"]

TP = tuple[str, int]

_SKIPPED: contextvars.ContextVar[float] = contextvars.ContextVar("kafka_dlq_memory_skipped", default=0.0)
"""Backoff seconds not waited for, per record task: its in-place budget runs on as though they had been."""


class StandInError(KafkaDLQError, AssertionError):
    """Something went wrong inside kafka-dlq, not in the handler: a dead letter it wrote does not decode, a dead
    letter could not be written, a classifier rule raised. :meth:`MemoryRetryingConsumer.drain` raises it."""


class MemoryRetryingConsumer:
    """The retrying consumer without Kafka. Same settings as :class:`~kafka_dlq.retrying.RetryingConsumer` (minus
    the connection), same behaviour; what Kafka would hold is in plain attributes:

    - ``processed``: the records the handler handled (as delivered), in the order they finished;
    - ``dead_letters``: the dead letters, decoded back from the records written (so exactly what the DLQ handler
      would read); ``dead_letter_records``: those records, with their ``dlq.*`` headers, as written to
      ``dlq_topic``;
    - ``backoffs``: every in-place backoff taken, in seconds (not waited, unless ``wait_backoffs=True``);
    - :meth:`committed`: the offsets a real consumer would have committed, per partition;
    - ``errors``: failures that are not the handler's (a bug in kafka-dlq, a classifier rule that raised):
      :meth:`drain` raises the first of them, so that a test cannot pass over one. The handler's own exceptions
      are outcomes (a retry, a dead letter), never errors.

    ``now_ms`` fixes the wall clock for failure times (default: the real clock). The in-place budget is measured
    as in production, handler time included; backoffs not waited for count as though they had been.
    """

    def __init__(
        self,
        handler: RecordHandler,
        *,
        group_id: str = "memory-consumer",
        dlq_topic: str | Callable[[str], str] | None = None,
        classifier: Classifier | None = None,
        policy: RetryPolicy | None = None,
        retry_budget: float | timedelta = 7.5,
        concurrency: int = 64,
        ordering: Ordering = Ordering.UNORDERED,
        spring_compatible: bool = False,
        handler_timeout: float | timedelta | None = None,
        wait_backoffs: bool = False,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        options: dict[str, Any] = {} if now_ms is None else {"now_ms": now_ms}
        self.engine = RetryEngine(
            handler,
            group_id=group_id,
            write_dead_letter=self._write,
            mark_done=self._mark_done,
            dlq_topic=dlq_topic,
            classifier=classifier,
            policy=policy,
            retry_budget=retry_budget,
            concurrency=concurrency,
            ordering=ordering,
            spring_compatible=spring_compatible,
            handler_timeout=handler_timeout,
            sleep=self._sleep,
            clock=_clock,
            on_error=self._failed,
            release=self._release,
            **options,
        )
        self.wait_backoffs = wait_backoffs
        self.processed: list[KafkaRecord] = []
        self.dead_letters: list[DeadLetter] = []
        self.dead_letter_records: list[KafkaRecord] = []
        self.backoffs: list[float] = []
        self.errors: list[BaseException] = []
        self._offsets: dict[TP, PartitionOffsets] = {}
        self._next_offset: dict[TP, int] = {}
        self._dead_lettered: set[tuple[TP, int]] = set()
        self._closed = False

    # ---------------------------------------------------------------- feeding records

    async def deliver(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes | None]] = (),
        partition: int = 0,
        timestamp: int | None = None,
    ) -> KafkaRecord:
        """Deliver a new record to the handler, at the partition's next offset; returns it. Does not wait for its
        outcome: :meth:`drain` (or leaving ``async with``) does."""
        tp = (topic, partition)
        offset = self._next_offset.get(tp, 0)
        record = KafkaRecord(
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp=timestamp,
            key=key,
            value=value,
            headers=tuple(headers),
        )
        await self.submit(record)
        return record

    async def submit(self, record: KafkaRecord) -> None:
        """Deliver ``record`` as it is (say, one built with redrive headers). Offsets of a partition must rise."""
        if self._closed:
            raise ClientClosedError("this in-memory consumer is closed; create a new one")
        tp = (record.topic, record.partition)
        if record.offset < self._next_offset.get(tp, 0):
            raise ValueError(
                f"offset {record.offset} of {record.topic}/{record.partition} was delivered already: offsets of a "
                "partition rise, as in Kafka"
            )
        self._next_offset[tp] = record.offset + 1
        self._offsets.setdefault(tp, PartitionOffsets(0)).delivered(record.offset)
        await self.engine.submit(record)

    async def drain(self, timeout: float | None = 30.0) -> None:
        """Wait until every delivered record has its outcome; TimeoutError after ``timeout`` seconds. Raises the
        first of ``errors`` (failures inside kafka-dlq, not the handler's), if any came."""
        finished = await self.engine.drain(timeout)
        self._raise_errors()
        if not finished:
            raise TimeoutError(f"{self.engine.in_flight} records still in progress after {timeout} s")

    def _raise_errors(self) -> None:
        if not self.errors:
            return
        first = self.errors[0]
        more = f" (and {len(self.errors) - 1} more in .errors)" if len(self.errors) > 1 else ""
        raise StandInError(f"the retrying consumer failed inside kafka-dlq{more}: {first!r}") from first

    async def close(self) -> None:
        """Cancel what is still in progress and let go of the sync handlers' threads."""
        self._closed = True
        await self.engine.cancel()
        self.engine.close()

    async def __aenter__(self) -> MemoryRetryingConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await self.drain()
        finally:
            await self.close()

    # ---------------------------------------------------------------- what Kafka would hold

    def committed(self) -> dict[TP, int]:
        """Per partition, the offset a real consumer would commit: one past the last record before which every
        record is processed or dead-lettered (partitions with nothing to commit are left out)."""
        return {tp: offsets.watermark for tp, offsets in self._offsets.items() if offsets.watermark is not None}

    def dead_lettered(self, record: KafkaRecord) -> bool:
        """True when ``record`` went to the dead-letter topic."""
        return ((record.topic, record.partition), record.offset) in self._dead_lettered

    def get_metrics(self) -> dict[str, int]:
        """The same counters as the Kafka-backed consumer's (without the partition counts)."""
        return self.engine.metrics()

    # ---------------------------------------------------------------- the engine's sinks

    async def _write(self, topic: str, encoded: EncodedRecord, dead_letter: DeadLetter) -> None:
        offset = self._next_offset.get((topic, 0), 0)
        self._next_offset[(topic, 0)] = offset + 1
        written = KafkaRecord(
            topic=topic,
            partition=0,
            offset=offset,
            timestamp=dead_letter.last_failure,
            key=encoded.key,
            value=encoded.value,
            headers=encoded.headers,
        )
        decoded = decode(written)
        # Our own encoder's output must decode: anything else is a bug in kafka-dlq, and a test must say so (the
        # engine reports it, drain() raises it; the record, as in Kafka, is not marked done).
        if not isinstance(decoded, DeadLetter):
            raise StandInError(f"kafka-dlq wrote a dead letter it cannot read back: {decoded.reason}")
        original = dead_letter.original
        if original.partition is None or original.offset is None:
            raise StandInError(f"a dead letter without its original coordinates: {dead_letter.original}")
        self._dead_lettered.add(((original.topic, original.partition), original.offset))
        self.dead_letter_records.append(written)
        self.dead_letters.append(decoded)

    def _mark_done(self, record: KafkaRecord) -> None:
        if not self.dead_lettered(record):
            self.processed.append(record)
        self._offsets[(record.topic, record.partition)].done(record.offset)

    def _release(self, record: KafkaRecord) -> None:
        # Given up without an outcome: no longer waited for, never committed past (read again, as in Kafka).
        self._offsets[(record.topic, record.partition)].release(record.offset)

    async def _sleep(self, seconds: float) -> None:
        self.backoffs.append(seconds)
        if not self.wait_backoffs:
            _SKIPPED.set(_SKIPPED.get() + seconds)  # this record's task only: other records' budgets run as before
        # Still a real suspension point, so that other records run meanwhile, as they would while this one waits.
        await asyncio.sleep(seconds if self.wait_backoffs else 0)

    def _failed(self, error: BaseException) -> None:
        self.errors.append(error)


def _clock() -> float:
    return time.monotonic() + _SKIPPED.get()
