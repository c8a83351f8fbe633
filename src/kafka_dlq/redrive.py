"""Operator tools over a dead-letter topic: peek at its records, redrive them home or park them, exactly once.

``redrive`` sends selected dead letters back to their original topic (or to ``to``) as they first were: the
original key, value and headers, with their failure history (``dlq.attempts`` and ``dlq.first.failure``, so a
record failing again carries its attempt count forward) and ``dlq.redrive.count`` one higher, so a record that
keeps failing is refused once it has been redriven ``max_redrives`` times (the loop guard); every other ``dlq.*``
header is gone. ``park`` copies selected dead letters to the poison topic with reason ``manual``. Both, by
default, exactly once:

- **Group.** A consumer group of the run's own, stable across reruns of the same (action, topic, filter,
  destination, loop-guard limit): ``kafka-dlq-redrive-<topic>-<hash>``. Records the filter skips commit too, so
  another filter is another group and starts from the beginning.
- **Transactions.** Records read with ``read_committed``; per batch, one transaction holds the records sent and the
  group's offsets for every record read (skipped ones included). A run killed at any point and run again continues
  where the last committed transaction stopped: nothing twice, nothing lost.
- **Fencing.** The ``transactional.id`` is ``<group>.tx`` and the consumer is a static member ``<group>.member``,
  stable for the group (whose name covers the filter, so the partition set too): a rerun fences the killed run's
  producer, aborting its open transaction, and takes its place in the group without waiting for its session to
  time out.
- **End.** A run ends at the high watermarks the topic had when it started, so it finishes while new dead letters
  arrive; those are for the next run.

``dry_run=True`` reads the same records (``read_committed``, from where the group stands, joining no group and
committing nothing) and reports what a run would send where, with samples. ``rate`` caps records sent per second
(a token bucket on the event loop).

>>> report = await redrive("127.0.0.1:19092", "orders.dlq",  # doctest: +SKIP
...                        select=RecordFilter(error_classes=("TimeoutError",)), rate=500)
>>> report.sent  # doctest: +SKIP
Counter({'orders': 1200})
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from kafka_dlq.errors import ConfigError, KafkaClientError, KafkaDLQError, TopicNotFoundError
from kafka_dlq.filters import RecordFilter
from kafka_dlq.formats import Undecodable, decode, encode_native
from kafka_dlq.formats.native import ATTEMPTS, FIRST_FAILURE, REDRIVE_COUNT
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, CommitMode, Headers, KafkaRecord, TransactionalProducer
from kafka_dlq.kafka import next_offsets as _next_offsets
from kafka_dlq.kafka.inspect import committed_offsets
from kafka_dlq.kafka.positions import positions
from kafka_dlq.kafka.reader import TopicReader
from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter

__all__ = [
    "DEFAULT_MAX_REDRIVES",
    "Action",
    "Guarantee",
    "Outgoing",
    "PeekReport",
    "RateLimiter",
    "Refusal",
    "RunReport",
    "default_group",
    "park",
    "park_record",
    "peek",
    "record_view",
    "redrive",
    "redrive_record",
    "show_bytes",
]

log = logging.getLogger("kafka_dlq.redrive")

DEFAULT_MAX_REDRIVES = 3
"""A dead letter redriven this many times already is refused: it failed after each of them."""
TXN_RECORDS = 5000
"""Records read per transaction, at most: fewer commits (each a broker round trip) against less work redone."""
TXN_SECONDS = 0.5
"""A transaction commits after this long even when short of ``TXN_RECORDS``, so progress shows and is kept."""
READ_BATCH = 1000
IDLE = 0.2
"""Seconds a read waits for records before the run checks whether it has reached its end."""
MAX_ABORTS = 5
"""Transactions aborted in a row (each retried) before the run gives up with the last error."""
SAMPLES = 20
"""Refusals and dry-run records listed in a report, at most."""


class Action(StrEnum):
    REDRIVE = "redrive"
    PARK = "park"


class Guarantee(StrEnum):
    """How a run commits: records and offsets in one transaction, or offsets after deliveries (may repeat)."""

    EXACTLY_ONCE = "exactly-once"
    AT_LEAST_ONCE = "at-least-once"


# ---------------------------------------------------------------- what one record becomes (pure)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record to send."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class Refusal:
    """A selected record the run will not send, and why (``kind``: ``loop_guard`` or ``undecodable``)."""

    kind: Literal["loop_guard", "undecodable"]
    detail: str


def redrive_record(
    decoded: DeadLetter | Undecodable, *, to: str | None = None, max_redrives: int = DEFAULT_MAX_REDRIVES
) -> Outgoing | Refusal:
    """The original record, headed home (or to ``to``) with its failure history and its redrive count one higher;
    or why not.

    The headers are the original record's own, then ``dlq.attempts`` and ``dlq.first.failure`` (as the native
    format writes them, whatever format the dead letter came in), then ``dlq.redrive.count``: a consumer that fails
    on the record again carries its attempt count forward. No other ``dlq.*`` header goes with it.

    >>> from kafka_dlq.records import OriginalRecord
    >>> original = OriginalRecord(topic="orders", key=b"k", value=b"v", headers=(("h", b"1"),))
    >>> out = redrive_record(DeadLetter(original=original, attempts=3, first_failure=1714564800000))
    >>> out.topic, out.key, out.value
    ('orders', b'k', b'v')
    >>> out.headers
    (('h', b'1'), ('dlq.attempts', b'3'), ('dlq.first.failure', b'1714564800000'), ('dlq.redrive.count', b'1'))
    >>> redrive_record(DeadLetter(original=original, redrive_count=3), max_redrives=3).kind
    'loop_guard'
    """
    if isinstance(decoded, Undecodable):
        return Refusal("undecodable", decoded.reason)
    if decoded.redrive_count >= max_redrives:
        return Refusal("loop_guard", f"redriven {decoded.redrive_count} times already (limit {max_redrives})")
    original = decoded.original
    # Decoders drop the headers of their own format; any other dlq.* header is stale metadata, not the record's.
    headers = tuple((name, value) for name, value in original.headers if not name.startswith("dlq."))
    headers += ((ATTEMPTS, str(decoded.attempts).encode()),)
    if decoded.first_failure is not None:
        headers += ((FIRST_FAILURE, str(decoded.first_failure).encode()),)
    headers += ((REDRIVE_COUNT, str(decoded.redrive_count + 1).encode()),)
    return Outgoing(to or original.topic, original.key, original.value, headers)


def park_record(record: KafkaRecord, decoded: DeadLetter | Undecodable, *, poison_topic: str) -> Outgoing:
    """The dead letter as the handler parks it, reason ``manual``; an undecodable one as it was, with the reason.

    >>> record = KafkaRecord(topic="orders.dlq", partition=0, offset=9, value=b"?")
    >>> park_record(record, decode(record), poison_topic="orders.dlq.poison").headers[0]
    ('dlq.reason', b'manual')
    """
    if isinstance(decoded, Undecodable):
        headers = (
            *record.headers,
            ("dlq.reason", Reason.MANUAL.value.encode()),
            ("dlq.error.class", b"kafka_dlq.Undecodable"),
            ("dlq.error.message", decoded.reason.encode("utf-8", "backslashreplace")),
        )
        return Outgoing(poison_topic, record.key, record.value, headers)
    encoded = encode_native(replace(decoded, reason=Reason.MANUAL))
    return Outgoing(poison_topic, encoded.key, encoded.value, encoded.headers)


def default_group(
    action: Action, topic: str, select: RecordFilter, destination: str | None, max_redrives: int | None = None
) -> str:
    """The run's consumer group: the same for the same action, topic, filter, destination and loop-guard limit.

    >>> default_group(Action.REDRIVE, "orders.dlq", RecordFilter(), None, 3)
    'kafka-dlq-redrive-orders.dlq-7adb7853'
    """
    spec = json.dumps([select.fingerprint(), destination, max_redrives])
    return f"kafka-dlq-{action.value}-{topic}-{hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()}"


# ---------------------------------------------------------------- rate


class RateLimiter:
    """A token bucket on the event loop that starts empty: from its first ``take``, never more than ``rate``
    records per second on average; after a pause (a commit), at most ``burst`` at once to catch up.

    ``burst`` defaults to a tenth of a second's worth. Waiting is ``asyncio.sleep``, never a blocking sleep.

    >>> limiter = RateLimiter(500)
    >>> for record in batch:  # doctest: +SKIP
    ...     await limiter.take()
    """

    def __init__(self, rate: float, *, burst: float | None = None) -> None:
        if rate <= 0:
            raise ConfigError(f"rate must be above 0 records per second (got {rate})")
        self.rate = rate
        self.burst = max(1.0, rate / 10 if burst is None else burst)
        self._tokens = 0.0
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        while self._tokens < 1:
            # 10 ms of tokens per sleep at least (within the burst): one sleep per record would cost more than it.
            await asyncio.sleep(min(self.burst, max(1 - self._tokens, self.rate * 0.01)) / self.rate)
            self._refill(loop.time())
        self._tokens -= 1


# ---------------------------------------------------------------- reports


@dataclass(kw_only=True)
class RunReport:
    """What a redrive or park run did (or, for a dry run, would do)."""

    action: Action
    topic: str
    group: str
    guarantee: Guarantee
    dry_run: bool
    select: RecordFilter
    max_redrives: int | None
    rate: float | None
    total: int = 0
    """Offsets between where the group stood and the end at start: an upper bound on the records to read."""
    read: int = 0
    skipped: int = 0
    """Records read that the filter did not select (their offsets commit all the same)."""
    sent: Counter[str] = field(default_factory=Counter)
    """Records sent (dry run: that would be sent), per destination topic."""
    refused: Counter[str] = field(default_factory=Counter)
    """Selected records not sent, per kind (``loop_guard``, ``undecodable``)."""
    refusals: list[dict[str, str]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    transactions: int = 0
    aborted: int = 0
    seconds: float = 0.0
    """From the first record read to the last commit."""

    @property
    def records_per_second(self) -> float:
        return sum(self.sent.values()) / self.seconds if self.seconds > 0 else 0.0

    def _refuse(self, record: KafkaRecord, refusal: Refusal) -> None:
        self.refused[refusal.kind] += 1
        if len(self.refusals) < SAMPLES:
            dlq = f"{record.topic}/{record.partition}/{record.offset}"
            self.refusals.append({"dlq": dlq, "kind": refusal.kind, "detail": refusal.detail})

    def _merge(self, other: RunReport) -> None:
        self.read += other.read
        self.skipped += other.skipped
        self.sent.update(other.sent)
        self.refused.update(other.refused)
        self.refusals.extend(other.refusals[: max(0, SAMPLES - len(self.refusals))])

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "topic": self.topic,
            "group": self.group,
            "guarantee": self.guarantee.value,
            "dry_run": self.dry_run,
            "filter": self.select.to_json(),
            "max_redrives": self.max_redrives,
            "rate_limit": self.rate,
            "total": self.total,
            "read": self.read,
            "selected": sum(self.sent.values()) + sum(self.refused.values()),
            "skipped": self.skipped,
            "sent": dict(sorted(self.sent.items())),
            "refused": dict(sorted(self.refused.items())),
            "refusals": self.refusals,
            **({"samples": self.samples} if self.dry_run else {}),
            "transactions": self.transactions,
            "aborted_transactions": self.aborted,
            "seconds": round(self.seconds, 3),
            "records_per_second": round(self.records_per_second, 1),
        }


@dataclass(kw_only=True)
class PeekReport:
    """What ``peek`` found: the matching records' views, and how many records it read to find them."""

    topic: str
    select: RecordFilter
    scanned: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "filter": self.select.to_json(),
            "scanned": self.scanned,
            "matched": len(self.records),
            "records": self.records,
        }


# ---------------------------------------------------------------- showing a record


def show_bytes(data: bytes, limit: int | None = None) -> str:
    """Bytes as text that is safe to print: UTF-8 where it is, every unprintable character escaped.

    >>> show_bytes(b"caf\\xc3\\xa9 \\x1b[31m\\xff")
    'café \\\\x1b[31m\\\\xff'
    """
    cut = data if limit is None else data[:limit]
    text = _escaped(cut.decode("utf-8", "backslashreplace"))
    return text if cut is data else f"{text}... ({len(data)} bytes)"


def _escaped(text: str) -> str:
    # Control characters (a terminal's escape sequences among them) are shown escaped, never sent raw.
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _printable(text: str | None) -> str | None:
    return None if text is None else _escaped(text)


def _value_view(data: bytes | None, limit: int) -> tuple[Any, str]:
    """The value as a JSON value when it is JSON (and not too long), else as escaped text."""
    if data is None:
        return None, "null"
    if len(data) <= limit:
        try:
            return json.loads(data), "json"
        except ValueError:  # not UTF-8, or not JSON
            pass
    return show_bytes(data, limit), "text"


def _iso(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def record_view(record: KafkaRecord, decoded: DeadLetter | Undecodable, *, max_bytes: int = 4096) -> dict[str, Any]:
    """A dead-letter record for people and scripts: where it sits, its decoded metadata, its key, value, headers.

    The key, the value and the headers are those of the original record (for an undecodable one, the record's
    own); the value is a JSON value when it is JSON, escaped text otherwise.
    """
    view: dict[str, Any] = {
        "dlq": f"{record.topic}/{record.partition}/{record.offset}",
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": _iso(record.timestamp),
    }
    if isinstance(decoded, Undecodable):
        key, value, headers = record.key, record.value, record.headers
        view["undecodable"] = _printable(decoded.reason)
        view["format"] = None if decoded.source_format is None else str(decoded.source_format)
    else:
        original, failure = decoded.original, decoded.failure
        key, value, headers = original.key, original.value, original.headers
        view["format"] = str(decoded.source_format)
        view["original"] = {
            "topic": _printable(original.topic),
            "partition": original.partition,
            "offset": original.offset,
            "timestamp": _iso(original.timestamp),
        }
        view["error"] = {"class": _printable(failure.error_class), "message": _printable(failure.message)}
        view["attempts"] = decoded.attempts
        view["first_failure"] = _iso(decoded.first_failure)
        view["last_failure"] = _iso(decoded.last_failure)
        view["group"] = _printable(decoded.group)
        view["reason"] = None if decoded.reason is None else decoded.reason.value
        view["redrive_count"] = decoded.redrive_count
    view["key"] = None if key is None else show_bytes(key, max_bytes)
    view["value"], view["value_format"] = _value_view(value, max_bytes)
    view["value_bytes"] = None if value is None else len(value)
    view["headers"] = [
        [_printable(name), None if data is None else show_bytes(data, max_bytes)] for name, data in headers
    ]
    return view


# ---------------------------------------------------------------- reading a topic from a start to an end


class _GroupReader:
    """Reads each partition from ``start`` up to ``end`` (exclusive), handing out only those records.

    The end of a partition is seen from the records read or, when transaction markers or aborted records lie just
    before it (never delivered under ``read_committed``), from the consumer's position once its buffer is empty.
    ``checkpoint``/``restore`` take the reader back with the consumer's ``rewind`` after an aborted transaction.
    """

    def __init__(
        self, consumer: AsyncConsumer, topic: str, start: Mapping[int, int], end: Mapping[int, int], batch: int
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.next = dict(start)  # per partition: the next offset this run still has to handle
        self.end = dict(end)
        self.batch = batch
        self._reached: set[int] = set()  # read to the end by position, and the buffer emptied since
        self._claimed: set[int] = set()  # at the end by position; the records before it may still be buffered
        self._track_done = consumer.commit_mode is CommitMode.EXTERNAL

    @property
    def finished(self) -> bool:
        return all(self.next[p] >= self.end[p] or p in self._reached for p in self.next)

    def checkpoint(self) -> tuple[dict[int, int], frozenset[int]]:
        return dict(self.next), frozenset(self._reached)

    def restore(self, checkpoint: tuple[dict[int, int], frozenset[int]]) -> None:
        self.next, self._reached = dict(checkpoint[0]), set(checkpoint[1])
        self._claimed.clear()

    async def read(self) -> list[KafkaRecord]:
        """The next records of the run, in partition order; [] when none came within ``IDLE`` seconds."""
        records = await self.consumer.getmany(max_records=self.batch, timeout=IDLE)
        mine: list[KafkaRecord] = []
        others: list[KafkaRecord] = []
        nexts, end = self.next, self.end
        for record in records:
            partition, offset = record.partition, record.offset
            if record.topic == self.topic and partition in nexts and nexts[partition] <= offset < end[partition]:
                nexts[partition] = offset + 1
                mine.append(record)
            else:
                others.append(record)
        if others and self._track_done:
            # Past the end (or a partition not selected): not ours to handle. In EXTERNAL mode done() commits
            # nothing, it only frees room; in TRACKED mode it would commit them, so they stay pending there.
            self.consumer.done_many(others)
        if len(records) < self.batch:
            # The buffer is empty: every record the thread had read when the claims were made is handled.
            self._reached |= self._claimed
            self._claimed.clear()
        if not mine and not self.finished:
            where = await positions(self.consumer)
            self._claimed = {
                p for p in nexts if nexts[p] < end[p] and where.get((self.topic, p), -1) >= end[p]
            } - self._reached
        return mine

    @property
    def handled(self) -> int:
        return sum(self.next.values())


# ---------------------------------------------------------------- the runs


RUN_OWNED = {
    "group.id": "its own group",
    "group.instance.id": "its own static member",
    "auto.offset.reset": "earliest: a new group reads every dead letter, from the start",
    "isolation.level": "read_committed",
    "enable.auto.commit": "off: it commits what it handled",
    "enable.auto.offset.store": "off: it commits what it handled",
    "enable.partition.eof": "its own end-of-partition handling",
    "transactional.id": "its own, for fencing",
    "enable.idempotence": "on: nothing twice from a retry",
    "acks": "all: nothing lost",
}
"""Kafka settings a run sets itself, and why; given ones (a handler's ``[kafka]`` table, -X) are left out, with a
warning: the handler's ``auto.offset.reset = "latest"``, say, would start the run's new group at the end, where
it would find nothing to send."""


def _config(bootstrap_servers: str, kafka_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The client settings given (security, timeouts, client id ...), less those a run owns, plus the servers."""
    config: dict[str, Any] = {}
    for key, value in (kafka_config or {}).items():
        if key in RUN_OWNED:
            log.warning("ignoring Kafka setting %s=%s: the run sets it itself (%s)", key, value, RUN_OWNED[key])
        else:
            config[key] = value
    return {**config, "bootstrap.servers": bootstrap_servers}


def _reader(config: dict[str, Any], topic: str) -> TopicReader:
    # Dead letters of an aborted transaction (a killed park) never happened: every read is read_committed.
    return TopicReader({**config, "isolation.level": "read_committed"}, [topic])


Span = tuple[dict[int, int], dict[int, int]]


async def _span(reader: TopicReader, config: dict[str, Any], select: RecordFilter, group: str | None) -> Span:
    """Per selected partition, where a run starts (where ``group`` stands, or the beginning; no earlier than the
    filter's first offset and time) and where it ends (the high watermark, or just past the filter's last offset).
    """
    stood = {} if group is None else await asyncio.to_thread(committed_offsets, config, group, reader.partitions)
    since = {} if select.since is None else await reader.offsets_for_time(select.since)
    start, end = {}, {}
    for tp, marks in reader.watermarks.items():
        if not select.partitions or tp[1] in select.partitions:
            start[tp[1]] = max(marks.low, stood.get(tp, 0), select.first_offset or 0, since.get(tp, 0))
            end[tp[1]] = marks.high if select.last_offset is None else min(marks.high, select.last_offset + 1)
    return start, end


async def _read(reader: TopicReader, topic: str, span: Span) -> AsyncIterator[list[KafkaRecord]]:
    """The records of ``span``, in batches, read without a group (peek and dry runs commit nothing)."""
    start, end = span
    async for batch in reader.batches(
        {(topic, p): o for p, o in start.items()}, end={(topic, p): o for p, o in end.items()}
    ):
        yield batch


class _Run:
    """One redrive or park run: reads the DLQ topic, decides per record, sends and commits."""

    def __init__(
        self,
        report: RunReport,
        config: dict[str, Any],
        plan: Callable[[KafkaRecord, DeadLetter | Undecodable], Outgoing | Refusal],
        limiter: RateLimiter | None,
        progress: Callable[[int, int], None] | None,
        sample: int,
    ) -> None:
        self.report = report
        self.config = config
        self.plan = plan
        self.limiter = limiter
        self.progress = progress or (lambda done, total: None)
        self.sample = sample
        self._metadata: Any = None
        self._started: float | None = None

    def _consumer(self, group: str, mode: CommitMode, *, static: bool) -> AsyncConsumer:
        config = {
            **self.config,
            "group.id": group,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
        if static:
            config["group.instance.id"] = f"{group}.member"
        return AsyncConsumer(
            config,
            [self.report.topic],
            commit_mode=mode,
            batch_size=READ_BATCH,
            on_assign=self._forget_metadata,
            on_revoke=self._forget_metadata,
        )

    def _forget_metadata(self, partitions: object) -> None:
        self._metadata = None  # a new generation: the transaction's offsets must carry the new metadata

    def _decide(self, record: KafkaRecord, tally: RunReport) -> Outgoing | None:
        tally.read += 1
        select = self.report.select
        if not select.in_range(record):
            tally.skipped += 1
            return None
        decoded = decode(record)
        if not select.matches(record, decoded):
            tally.skipped += 1
            return None
        outcome = self.plan(record, decoded)
        if isinstance(outcome, Refusal):
            tally._refuse(record, outcome)
            return None
        tally.sent[outcome.topic] += 1
        if self.report.dry_run and len(self.report.samples) < self.sample:
            view = record_view(record, decode(record), max_bytes=512)
            self.report.samples.append({**view, "destination": outcome.topic})
        return outcome

    def _tally(self) -> RunReport:
        return replace(self.report, sent=Counter(), refused=Counter(), refusals=[], samples=[], read=0, skipped=0)

    def _clock(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().time()

    def _stop_clock(self) -> None:
        if self._started is not None:
            self.report.seconds = asyncio.get_running_loop().time() - self._started

    async def _span(self) -> Span | None:
        """Where the run starts and ends per partition (setting ``total``); None when there is nothing to read."""
        async with _reader(self.config, self.report.topic) as reader:
            start, end = await _span(reader, self.config, self.report.select, self.report.group)
        self.report.total = sum(max(0, end[p] - start[p]) for p in start)
        return None if all(start[p] >= end[p] for p in start) else (start, end)

    async def run(self) -> RunReport:
        report = self.report
        if report.dry_run:
            await self._dry_run()
        elif report.guarantee is Guarantee.EXACTLY_ONCE:
            await self._exactly_once()
        else:
            await self._at_least_once()
        return report

    # -- dry run: read from where the group stands, joining no group, committing nothing

    async def _dry_run(self) -> None:
        report = self.report
        async with _reader(self.config, report.topic) as reader:
            span = await _span(reader, self.config, report.select, report.group)
            report.total = sum(max(0, span[1][p] - span[0][p]) for p in span[0])
            async for batch in _read(reader, report.topic, span):
                for record in batch:
                    self._decide(record, report)
                self.progress(report.read, report.total)

    # -- exactly once: one transaction per batch for the records sent and the offsets read

    async def _exactly_once(self) -> None:
        report = self.report
        producer = TransactionalProducer(
            {**self.config, "transactional.id": f"{report.group}.tx"},
            name=f"{report.action.value}-producer",
            # Each transaction waits on three calls to the producer's thread, which answers between polls: a short
            # poll answers them sooner (at 50 ms, waiting took a fifth of a run's time).
            poll_timeout=0.005,
        )
        # The producer first: init_transactions fences a killed run and settles its open transaction, whose
        # offsets the group's committed offsets (read next, and by the consumer at start) would otherwise wait on.
        async with producer:
            span = await self._span()
            if span is None:
                return
            async with self._consumer(report.group, CommitMode.EXTERNAL, static=True) as consumer:
                reader = _GroupReader(consumer, report.topic, *span, min(READ_BATCH, self._txn_records()))
                base, aborts = reader.handled, 0
                while not reader.finished:
                    committed = await self._transaction(producer, consumer, reader)
                    aborts = 0 if committed else aborts + 1
                    self.progress(reader.handled - base, report.total)
                    if aborts >= MAX_ABORTS:
                        raise KafkaDLQError(f"{MAX_ABORTS} transactions in a row aborted: see the warnings above")
                self._stop_clock()

    def _txn_records(self) -> int:
        if self.limiter is None:
            return TXN_RECORDS
        return max(1, min(TXN_RECORDS, int(self.limiter.rate * TXN_SECONDS)))  # a rate-limited batch still commits

    async def _transaction(
        self, producer: TransactionalProducer, consumer: AsyncConsumer, reader: _GroupReader
    ) -> bool:
        """Read, send and commit one batch; False when the transaction aborted (the reader is rewound)."""
        checkpoint = reader.checkpoint()
        records = await reader.read()
        if not records:
            return True
        self._clock()
        loop = asyncio.get_running_loop()
        deadline, limit = loop.time() + TXN_SECONDS, self._txn_records()
        tally, handled, futures = self._tally(), [], []
        await producer.begin()
        try:
            while True:
                handled += records
                for record in records:
                    outgoing = self._decide(record, tally)
                    if outgoing is not None:
                        if self.limiter is not None:
                            await self.limiter.take()
                        futures.append(
                            await producer.send(
                                outgoing.topic, outgoing.value, key=outgoing.key, headers=outgoing.headers
                            )
                        )
                if len(handled) >= limit or loop.time() >= deadline or reader.finished:
                    break
                records = await reader.read()
                if not records:
                    break
            if self._metadata is None:
                self._metadata = await consumer.group_metadata()
            await producer.send_offsets(_next_offsets(handled), self._metadata)
            await producer.commit()
        except KafkaClientError as exc:
            consumer.done_many(handled)  # read again after the rewind (or not at all): nothing to wait for at close
            for future in futures:  # their outcome is the transaction's: retrieved, so none is logged as lost
                if future.done():
                    future.exception()
                else:
                    future.cancel()
            try:
                await producer.abort()
            except KafkaClientError as abort_error:
                log.warning("%s: aborting the transaction failed: %s", self.report.action.value, abort_error)
                raise _stopped(self.report, exc) from exc
            if not exc.abortable:
                raise _stopped(self.report, exc) from exc
            log.warning("%s: transaction aborted, its batch is read again: %s", self.report.action.value, exc)
            self.report.aborted += 1
            reader.restore(checkpoint)
            await consumer.rewind()
            return False
        consumer.done_many(handled)
        self.report._merge(tally)
        self.report.transactions += 1
        self._stop_clock()
        return True

    # -- at least once: offsets commit (by the consumer) once the batch's records are delivered

    async def _at_least_once(self) -> None:
        report, span = self.report, await self._span()
        if span is None:
            return
        producer = AsyncProducer(self.config, name=f"{report.action.value}-producer")
        async with producer, self._consumer(report.group, CommitMode.TRACKED, static=True) as consumer:
            reader = _GroupReader(consumer, report.topic, *span, READ_BATCH)
            base = reader.handled
            pending: deque[asyncio.Future[Any]] = deque()
            while not reader.finished:
                records = await reader.read()
                if records:
                    self._clock()
                sent: list[asyncio.Future[Any]] = []
                for record in records:
                    outgoing = self._decide(record, report)
                    if outgoing is None:
                        continue
                    if self.limiter is not None:
                        await self.limiter.take()
                    sent.append(
                        await producer.send(outgoing.topic, outgoing.value, key=outgoing.key, headers=outgoing.headers)
                    )
                if records:
                    # The batch's offsets may commit once its records are all delivered.
                    delivered = asyncio.gather(*sent)
                    delivered.add_done_callback(functools.partial(_mark_done, consumer, records))
                    pending.append(delivered)
                    # Batches delivered are let go of as the run goes (a failed one raises here): kept to the end,
                    # every record's future stays alive, and the garbage collector walks them all, again and again.
                    while pending and pending[0].done():
                        pending.popleft().result()
                    self.progress(reader.handled - base, report.total)
            await asyncio.gather(*pending)
            await consumer.commit()
            self._stop_clock()


def _mark_done(consumer: AsyncConsumer, batch: list[KafkaRecord], delivered: asyncio.Future[Any]) -> None:
    if not delivered.cancelled() and delivered.exception() is None:
        consumer.done_many(batch)


def _stopped(report: RunReport, exc: KafkaClientError) -> KafkaDLQError:
    if isinstance(exc, TopicNotFoundError):
        return exc  # it names the topic and what to do
    note = " (another run of this group took over?)" if exc.fatal else ""
    return KafkaDLQError(
        f"{report.action.value} of {report.topic!r} stopped{note}: {exc}. Nothing past the last committed batch "
        f"was kept: run it again to continue (group {report.group})"
    )


async def redrive(
    bootstrap_servers: str,
    topic: str,
    *,
    select: RecordFilter | None = None,
    to: str | None = None,
    group: str | None = None,
    rate: float | None = None,
    max_redrives: int = DEFAULT_MAX_REDRIVES,
    guarantee: Guarantee = Guarantee.EXACTLY_ONCE,
    dry_run: bool = False,
    sample: int = 5,
    kafka_config: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Send the selected dead letters of ``topic`` back to their original topics (or ``to``); see the module.

    ``progress(done, total)`` is told the offsets handled so far after each commit. Raises TopicNotFoundError
    when a destination does not exist: create it (or choose ``to``) and run again; the run continues.
    """
    select = select or RecordFilter()
    if max_redrives < 1:
        raise ConfigError(f"max_redrives must be at least 1 (got {max_redrives})")
    report = RunReport(
        action=Action.REDRIVE,
        topic=topic,
        group=group or default_group(Action.REDRIVE, topic, select, to, max_redrives),
        guarantee=guarantee,
        dry_run=dry_run,
        select=select,
        max_redrives=max_redrives,
        rate=rate,
    )

    def plan(record: KafkaRecord, decoded: DeadLetter | Undecodable) -> Outgoing | Refusal:
        return redrive_record(decoded, to=to, max_redrives=max_redrives)

    limiter = None if rate is None else RateLimiter(rate)
    return await _Run(report, _config(bootstrap_servers, kafka_config), plan, limiter, progress, sample).run()


async def park(
    bootstrap_servers: str,
    topic: str,
    *,
    select: RecordFilter | None = None,
    poison_topic: str | None = None,
    group: str | None = None,
    rate: float | None = None,
    guarantee: Guarantee = Guarantee.EXACTLY_ONCE,
    dry_run: bool = False,
    sample: int = 5,
    kafka_config: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Copy the selected dead letters of ``topic`` to the poison topic (default ``<topic>.poison``), reason ``manual``.

    Exactly once, like ``redrive``; the dead letters stay where they are (a topic is a log).
    """
    select = select or RecordFilter()
    poison = poison_topic or f"{topic}.poison"
    report = RunReport(
        action=Action.PARK,
        topic=topic,
        group=group or default_group(Action.PARK, topic, select, poison),
        guarantee=guarantee,
        dry_run=dry_run,
        select=select,
        max_redrives=None,
        rate=rate,
    )

    def plan(record: KafkaRecord, decoded: DeadLetter | Undecodable) -> Outgoing | Refusal:
        return park_record(record, decoded, poison_topic=poison)

    limiter = None if rate is None else RateLimiter(rate)
    return await _Run(report, _config(bootstrap_servers, kafka_config), plan, limiter, progress, sample).run()


async def peek(
    bootstrap_servers: str,
    topic: str,
    *,
    select: RecordFilter | None = None,
    limit: int = 20,
    max_bytes: int = 4096,
    kafka_config: Mapping[str, Any] | None = None,
) -> PeekReport:
    """The first ``limit`` dead letters of ``topic`` the filter selects, read (``read_committed``) from the start.

    Reads up to the end the topic had when it began, joining no group and committing nothing; a time or offset
    filter's lower bound is where reading starts.
    """
    select = select or RecordFilter()
    config = _config(bootstrap_servers, kafka_config)
    report = PeekReport(topic=topic, select=select)
    if limit < 1:
        return report
    async with _reader(config, topic) as reader:
        span = await _span(reader, config, select, None)
        async for batch in _read(reader, topic, span):
            for record in batch:
                report.scanned += 1
                decoded = decode(record)
                if select.matches(record, decoded):
                    report.records.append(record_view(record, decoded, max_bytes=max_bytes))
                    if len(report.records) >= limit:
                        return report
    return report
