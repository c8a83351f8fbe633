"""``kafka-dlq stats``: what a dead-letter (or poison) topic holds, grouped by original topic, error and reason.

Fast on large topics because it decodes only what it counts:

- the topic is read with :class:`~kafka_dlq.kafka.reader.TopicReader` (explicit assignment, large fetches, up to
  the high watermarks captured at start) and the counting runs on the reader's thread, batch by batch, so no
  record outlives its batch and the event loop does nothing per record;
- per record, only the few headers counted are read (original topic, error class, reason, failure times), found
  the way :func:`kafka_dlq.formats.decode` finds the format; no ``DeadLetter`` is built and no value is touched,
  except for the seed system's JSON envelope, whose facts are in the value;
- per record, the tally is one dictionary entry per distinct (original topic, error class, reason, format).

Counts follow the headers: a record whose original topic cannot be read counts as ``undecodable`` (the handler
would park it); one with a readable topic but another broken header counts under its topic (the handler would
park it as undecodable too, which ``decode`` tells precisely, record by record).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from kafka_dlq.formats import SourceFormat, connect, native, seed, spring
from kafka_dlq.formats._common import FormatError, NotThisFormat
from kafka_dlq.kafka.inspect import committed_offsets
from kafka_dlq.kafka.reader import TopicReader
from kafka_dlq.kafka.record import KafkaRecord

__all__ = ["ErrorGroup", "PartitionStats", "TopicStats", "collect_stats", "summarize"]

NONE = "(none)"
"""How a missing error class or reason shows in the counts."""

TP = tuple[str, int]
Summary = tuple[str | None, str | None, str | None, str | None, int | None, int | None]
"""(original topic, error class, reason, format, first failure ms, last failure ms) of one record."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorGroup:
    """Dead letters of one original topic failing with one error class."""

    original_topic: str | None
    error_class: str | None
    records: int
    oldest_failure: int | None
    newest_failure: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionStats:
    topic: str
    partition: int
    low: int
    high: int
    records: int
    """Records read (fewer than ``high - low`` where transaction markers or compaction took offsets)."""
    committed: int | None = None
    """The group's committed offset; None without a group or before its first commit."""
    lag: int | None = None
    """``high - committed`` (``high - low`` before the first commit), never below 0; None without a group."""


@dataclass(frozen=True, kw_only=True)
class TopicStats:
    """What ``collect_stats`` found. Times are epoch milliseconds."""

    topics: list[str]
    records: int
    undecodable: int
    """Records without a readable original topic."""
    by_original_topic: dict[str, int]
    by_error_class: dict[str, int]
    by_reason: dict[str, int]
    """Parked records by ``dlq.reason`` (poison topics); records without a reason are not counted here."""
    by_format: dict[str, int]
    groups: list[ErrorGroup]
    """By original topic and error class, largest first."""
    oldest_failure: int | None
    """The earliest first failure of any record."""
    newest_failure: int | None
    """The latest last failure of any record."""
    partitions: list[PartitionStats]
    group: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["oldest_failure_at"] = _iso(self.oldest_failure)
        out["newest_failure_at"] = _iso(self.newest_failure)
        out["lag"] = None if self.group is None else sum(p.lag or 0 for p in self.partitions)
        return out


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- one record, headers only

_SPRING_DLT_TOPIC, _SPRING_RETRY_TOPIC = spring.DLT.topic, spring.RETRY.topic
_NATIVE_FAILURE = native.HEADERS - native.CARRIED
_CONNECT, _STREAMS, _SHARE = connect.CONNECT_PREFIX, connect.STREAMS_PREFIX, connect.SHARE_PREFIX
# Plain strings (not the enum) in the tally: they are what the counts and the JSON show.
_NATIVE, _SEED = SourceFormat.NATIVE.value, SourceFormat.SEED_JSON.value
_SPRING, _SPRING_RETRY = SourceFormat.SPRING.value, SourceFormat.SPRING_RETRY.value
_CONNECT_F, _STREAMS_F, _SHARE_F = (
    SourceFormat.CONNECT.value,
    SourceFormat.STREAMS.value,
    SourceFormat.SHARE_GROUP.value,
)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _topic(value: bytes | None) -> str | None:
    """The original topic as ``decode`` accepts it: present, valid UTF-8, not empty; else None (undecodable)."""
    if not value:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _ms(value: bytes | None, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return default


def _starts(h: Mapping[str, bytes | None], prefix: str) -> bool:
    return any(name.startswith(prefix) for name in h)


_NOT_JSON_OBJECT = frozenset(range(0x21, 0x7F)) - {ord("{")}
"""First bytes no JSON object starts with, in any encoding ``json.loads`` detects: printable ASCII other than
``{`` (UTF-8 starts with ``{`` or whitespace; UTF-16 and UTF-32 with NUL, ``{`` or a byte mark above 0x7F)."""


def _spring(h: Mapping[str, bytes | None], names: spring.SpringNames) -> str | None:
    # As spring.decode_*: the root cause names the error; else the value's exception, else the key's.
    outer = _text(h.get(names.exception) if names.exception in h else h.get(names.key_exception))
    return _text(h.get(names.cause)) or outer


def summarize(record: KafkaRecord) -> Summary:
    """The facts ``stats`` counts for one dead letter, read from as little of it as possible.

    The format is found as :func:`kafka_dlq.formats.decode` finds it; the original topic is None when it cannot
    be read (the record is undecodable). A record in another format that a redrive sent home and that failed again
    carries its first failure in ``dlq.first.failure``, the earlier time as decode reads it.

    >>> summarize(KafkaRecord(topic="orders.dlq", partition=0, offset=0, timestamp=1000,
    ...           headers=(("dlq.original.topic", b"orders"), ("dlq.error.class", b"builtins.KeyError"))))
    ('orders', 'builtins.KeyError', None, 'native', 1000, 1000)
    """
    h = dict(record.headers)  # the last of a repeated header wins, as in decode
    summary = _summarize(record, h)
    carried = h.get(native.FIRST_FAILURE)
    if carried is None or summary[3] is None or summary[3] == _NATIVE:
        return summary
    topic, error, reason, source, first, last = summary
    return (topic, error, reason, source, native.earlier(_ms(carried, None), first), last)


def _summarize(record: KafkaRecord, h: Mapping[str, bytes | None]) -> Summary:
    ts = record.timestamp
    reason = _text(h.get(native.REASON))
    if native.TOPIC in h:
        return (
            _topic(h[native.TOPIC]),
            _text(h.get(native.ERROR_CLASS)),
            reason,
            _NATIVE,
            _ms(h.get(native.FIRST_FAILURE), ts),
            _ms(h.get(native.LAST_FAILURE), ts),
        )
    if h:
        # One string of every name, each after a NUL: a prefix test is then one substring search in C instead of
        # a Python loop over the names; a hit is confirmed name by name (a name may itself hold a NUL).
        names = "\0" + "\0".join(h)
        if "\0" + spring.DLT_PREFIX in names and _starts(h, spring.DLT_PREFIX):
            return (_topic(h.get(_SPRING_DLT_TOPIC)), _spring(h, spring.DLT), reason, _SPRING, ts, ts)
        if not spring.RETRY_HEADERS.isdisjoint(h):
            topic = _topic(h.get(_SPRING_RETRY_TOPIC))
            return (topic, _spring(h, spring.RETRY), reason, _SPRING_RETRY, ts, ts)
        if "\0" + _CONNECT in names and _starts(h, _CONNECT):
            error = _text(h.get(_CONNECT + "exception.class.name"))
            return (_topic(h.get(_CONNECT + "topic")), error, reason, _CONNECT_F, ts, ts)
        if "\0" + _STREAMS in names and _starts(h, _STREAMS):
            exception = _text(h.get(_STREAMS + "exception"))
            error = None if exception is None else exception.split(":", 1)[0].strip()
            return (_topic(h.get(_STREAMS + "topic")), error, reason, _STREAMS_F, ts, ts)
        if "\0" + _SHARE in names and _starts(h, _SHARE):
            return (_topic(h.get(_SHARE + "topic")), None, reason, _SHARE_F, ts, ts)
        if not _NATIVE_FAILURE.isdisjoint(h):
            # Native metadata without the original topic (a record parked raw as undecodable): undecodable. The
            # headers a redrive sends home do not count: a system that keeps headers carries them along.
            return (None, _text(h.get(native.ERROR_CLASS)), reason, _NATIVE, ts, ts)
    value = record.value
    if not value or (value[0] in _NOT_JSON_OBJECT):
        return (None, None, reason, None, ts, ts)  # no envelope can start so: skip the parser and its exception
    # No dead-letter headers: the seed system's JSON envelope, the one format whose facts are in the value.
    try:
        dead_letter = seed.decode_seed(record)
    except NotThisFormat:  # no known format at all
        return (None, None, reason, None, ts, ts)
    except FormatError:  # a broken envelope
        return (None, None, reason, _SEED, ts, ts)
    except Exception:  # as decode: a decoder's bug makes one record undecodable, not the whole count fail
        return (None, None, reason, _SEED, ts, ts)
    error = dead_letter.failure.error_class
    return (dead_letter.original.topic, error, reason, _SEED, dead_letter.first_failure, ts)


# ---------------------------------------------------------------- the tally, on the reader's thread


class _Tally:
    """Counts per distinct (topic, error class, reason, format): [records, oldest first failure, newest last]."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str | None, str | None, str | None, str | None], list[Any]] = {}
        self.per_partition: dict[TP, int] = {}

    def add(self, batch: list[KafkaRecord]) -> None:
        cells, per_partition = self.cells, self.per_partition
        where: TP | None = None
        run = 0
        for record in batch:
            topic, error, reason, source, first, last = summarize(record)
            key = (topic, error, reason, source)
            cell = cells.get(key)
            if cell is None:
                cells[key] = [1, first, last]
            else:
                cell[0] += 1
                if first is not None and (cell[1] is None or first < cell[1]):
                    cell[1] = first
                if last is not None and (cell[2] is None or last > cell[2]):
                    cell[2] = last
            # Records come in runs of one partition: count a run at once.
            here = (record.topic, record.partition)
            if here != where:
                if where is not None:
                    per_partition[where] = per_partition.get(where, 0) + run
                where, run = here, 0
            run += 1
        if where is not None:
            per_partition[where] = per_partition.get(where, 0) + run


def _merge(first: int | None, other: int | None, pick: Callable[[int, int], int]) -> int | None:
    if first is None:
        return other
    return first if other is None else pick(first, other)


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _result(tally: _Tally, reader: TopicReader, committed: dict[TP, int] | None, group: str | None) -> TopicStats:
    by_topic: dict[str, int] = {}
    by_error: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    by_format: dict[str, int] = {}
    groups: dict[tuple[str | None, str | None], list[Any]] = {}
    undecodable = total = 0
    oldest: int | None = None
    newest: int | None = None
    for (topic, error, reason, source), (count, first, last) in tally.cells.items():
        total += count
        if topic is None:
            undecodable += count
        else:
            by_topic[topic] = by_topic.get(topic, 0) + count
        by_error[error or NONE] = by_error.get(error or NONE, 0) + count
        if reason is not None:
            by_reason[reason] = by_reason.get(reason, 0) + count
        by_format[source or "unknown"] = by_format.get(source or "unknown", 0) + count
        cell = groups.setdefault((topic, error), [0, None, None])
        cell[0] += count
        cell[1] = _merge(cell[1], first, min)
        cell[2] = _merge(cell[2], last, max)
        oldest = _merge(oldest, first, min)
        newest = _merge(newest, last, max)
    partitions = []
    for (topic, partition), marks in sorted(reader.watermarks.items()):
        done = None if committed is None else committed.get((topic, partition))
        lag = None
        if committed is not None:
            # Never below zero: a group may have committed past the end (offsets set by hand, a recreated topic).
            lag = max(0, marks.high - (marks.low if done is None else max(done, marks.low)))
        partitions.append(
            PartitionStats(
                topic=topic,
                partition=partition,
                low=marks.low,
                high=marks.high,
                records=tally.per_partition.get((topic, partition), 0),
                committed=done,
                lag=lag,
            )
        )
    ranked = sorted(groups.items(), key=lambda item: (-item[1][0], str(item[0])))
    return TopicStats(
        topics=reader.topics,
        records=total,
        undecodable=undecodable,
        by_original_topic=_sorted(by_topic),
        by_error_class=_sorted(by_error),
        by_reason=_sorted(by_reason),
        by_format=_sorted(by_format),
        groups=[
            ErrorGroup(original_topic=t, error_class=e, records=c, oldest_failure=o, newest_failure=n)
            for (t, e), (c, o, n) in ranked
        ],
        oldest_failure=oldest,
        newest_failure=newest,
        partitions=partitions,
        group=group,
    )


async def collect_stats(
    config: Mapping[str, Any],
    topics: Sequence[str],
    *,
    group: str | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> TopicStats:
    """Read ``topics`` to their current end and count their dead letters.

    ``config`` is a librdkafka configuration (``bootstrap.servers`` at least). With ``group``, each partition's
    lag is the high watermark less that group's committed offset. ``progress(read, total)`` is called on the loop
    as batches are counted (``total`` is the offsets between the watermarks).

    >>> stats = await collect_stats({"bootstrap.servers": "127.0.0.1:19092"}, ["orders.dlq"])  # doctest: +SKIP
    >>> stats.by_error_class                                                                  # doctest: +SKIP
    {'builtins.ConnectionError': 812, 'java.lang.IllegalStateException': 40}
    """
    started = time.perf_counter()
    tally = _Tally()
    async with TopicReader(config, topics) as reader:
        total = sum(marks.span for marks in reader.watermarks.values())
        report = None if progress is None else (lambda read: progress(read, total))
        await reader.fold(tally.add, progress=report)
        committed = None
        if group is not None:
            committed = await asyncio.to_thread(committed_offsets, config, group, reader.partitions)
        stats = _result(tally, reader, committed, group)
    return replace(stats, seconds=round(time.perf_counter() - started, 3))
