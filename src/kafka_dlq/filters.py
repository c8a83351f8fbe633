"""Which dead letters an operator tool acts on: the record filter shared by ``peek``, ``redrive`` and ``park``.

Pure: a filter takes a dead-letter record and what it decoded to, and says yes or no. Every criterion given must
hold (AND); a criterion given several values holds when any of them does (OR). An empty filter selects every
record. What each criterion looks at:

- ``since`` / ``until``: the dead-letter record's own timestamp (when it entered the DLQ), epoch ms,
  ``since <= t < until``;
- ``partitions``, ``first_offset`` / ``last_offset``: where the record sits in the DLQ topic (offsets inclusive);
- ``original_topics``: the topic the record failed on;
- ``error_classes``: the failure's class, fully qualified (``builtins.ValueError``) or by its last part
  (``ValueError``);
- ``error_pattern``: a regular expression searched, case-insensitively, in the error class and in the message;
- ``keys``: the original key, byte for byte;
- ``headers``: ``(name, value)`` pairs, each present on the record (its own headers or the original ones), with
  that value; a value of None only asks that the header be present.

Criteria on the failure (original topic, error, key) never select an undecodable record.

>>> from kafka_dlq.kafka import KafkaRecord
>>> from kafka_dlq.formats import decode
>>> record = KafkaRecord(topic="orders.dlq", partition=0, offset=7, key=b"o-1",
...                      headers=(("dlq.original.topic", b"orders"), ("dlq.error.class", b"builtins.KeyError")))
>>> RecordFilter(error_classes=("KeyError",), original_topics=("orders", "payments")).matches(record, decode(record))
True
>>> RecordFilter(keys=(b"o-2",)).matches(record, decode(record))
False
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka_dlq.errors import ConfigError
from kafka_dlq.formats import Undecodable
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter

__all__ = ["RecordFilter", "check_resumable", "is_relative", "parse_header", "parse_offsets", "parse_time"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordFilter:
    """A selection of dead letters; see the module's documentation for what each criterion matches."""

    since: int | None = None
    until: int | None = None
    partitions: frozenset[int] = frozenset()
    first_offset: int | None = None
    last_offset: int | None = None
    original_topics: tuple[str, ...] = ()
    error_classes: tuple[str, ...] = ()
    error_pattern: str | None = None
    keys: tuple[bytes, ...] = ()
    headers: tuple[tuple[str, bytes | None], ...] = ()

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigError(f"the time range is empty: since ({self.since}) is not before until ({self.until})")
        if self.first_offset is not None and self.last_offset is not None and self.first_offset > self.last_offset:
            raise ConfigError(f"the offset range {self.first_offset}-{self.last_offset} is empty: swap its ends")
        if self.error_pattern is not None:
            try:
                re.compile(self.error_pattern)
            except re.error as exc:
                raise ConfigError(f"error pattern {self.error_pattern!r} is not a regular expression: {exc}") from None

    @property
    def is_empty(self) -> bool:
        """True when the filter selects every record."""
        return self == RecordFilter()

    @property
    def needs_failure(self) -> bool:
        """True when a criterion looks at the decoded failure (an undecodable record can never match)."""
        return bool(self.original_topics or self.error_classes or self.error_pattern or self.keys)

    def in_range(self, record: KafkaRecord) -> bool:
        """The criteria on where and when the record sits in the DLQ: no decoding needed."""
        if self.partitions and record.partition not in self.partitions:
            return False
        if self.first_offset is not None and record.offset < self.first_offset:
            return False
        if self.last_offset is not None and record.offset > self.last_offset:
            return False
        if self.since is not None or self.until is not None:
            stamp = record.timestamp
            if stamp is None:
                return False
            if self.since is not None and stamp < self.since:
                return False
            if self.until is not None and stamp >= self.until:
                return False
        return True

    def matches(self, record: KafkaRecord, decoded: DeadLetter | Undecodable) -> bool:
        """True when the dead-letter ``record`` (and ``decoded``, what it decodes to) is selected."""
        if not self.in_range(record):
            return False
        if self.headers and not all(_has_header(record, decoded, name, value) for name, value in self.headers):
            return False
        if not self.needs_failure:
            return True
        if isinstance(decoded, Undecodable):
            return False
        if self.original_topics and decoded.original.topic not in self.original_topics:
            return False
        if self.keys and decoded.original.key not in self.keys:
            return False
        error_class = decoded.failure.error_class or ""
        if self.error_classes and not any(_same_class(error_class, wanted) for wanted in self.error_classes):
            return False
        if self.error_pattern is not None:
            pattern = re.compile(self.error_pattern, re.IGNORECASE)  # re caches compiled patterns
            if not (pattern.search(error_class) or pattern.search(decoded.failure.message or "")):
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        """The criteria given, as JSON values (keys and header values as text, undecodable bytes escaped)."""
        out: dict[str, Any] = {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "partitions": sorted(self.partitions) or None,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
            "original_topics": list(self.original_topics) or None,
            "error_classes": list(self.error_classes) or None,
            "error_pattern": self.error_pattern,
            "keys": [_text(key) for key in self.keys] or None,
            "headers": [[name, None if value is None else _text(value)] for name, value in self.headers] or None,
        }
        return {name: value for name, value in out.items() if value is not None}

    def fingerprint(self) -> str:
        """A short stable hash of the criteria: equal filters, however written, give the same one."""
        canonical = {
            "since": self.since,
            "until": self.until,
            "partitions": sorted(self.partitions),
            "offsets": [self.first_offset, self.last_offset],
            "original_topics": sorted(set(self.original_topics)),
            "error_classes": sorted(set(self.error_classes)),
            "error_pattern": self.error_pattern,
            "keys": sorted({key.hex() for key in self.keys}),
            "headers": sorted({(name, None if value is None else value.hex()) for name, value in self.headers}),
        }
        text = json.dumps(canonical, sort_keys=True, default=list)
        return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _same_class(error_class: str, wanted: str) -> bool:
    # "ValueError" names builtins.ValueError; a dotted name must match whole (no "a.ValueError" for "b.ValueError").
    return error_class == wanted or ("." not in wanted and error_class.rpartition(".")[2] == wanted)


def _has_header(record: KafkaRecord, decoded: DeadLetter | Undecodable, name: str, value: bytes | None) -> bool:
    headers = record.headers if isinstance(decoded, Undecodable) else record.headers + decoded.original.headers
    return any(have == name and (value is None or got == value) for have, got in headers)


def _iso(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="milliseconds")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- parsing the command line's spellings

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, *, now_ms: int) -> int:
    """A moment as epoch milliseconds from ISO-8601, epoch seconds or milliseconds, or a duration ago.

    >>> parse_time("2024-05-01T12:00:00Z", now_ms=0)
    1714564800000
    >>> parse_time("1714564800", now_ms=0), parse_time("1714564800000", now_ms=0)
    (1714564800000, 1714564800000)
    >>> parse_time("90m", now_ms=10_000_000)  # 90 minutes before now
    4600000
    """
    spelled = text.strip()
    duration = _DURATION.fullmatch(spelled)
    if duration:
        amount, unit = float(duration.group(1)), duration.group(2).lower()
        return now_ms - round(amount * _UNIT_SECONDS[unit] * 1000)
    if spelled.isdigit():
        number = int(spelled)
        return number * 1000 if number < 100_000_000_000 else number  # below 1e11: seconds (as the formats read)
    try:
        moment = datetime.fromisoformat(spelled)
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a time: use ISO-8601 (2024-05-01T12:00:00Z), epoch seconds or milliseconds, "
            "or a duration ago (30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # as the dead-letter formats read times without an offset
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def is_relative(text: str) -> bool:
    """True for a moment written as a duration ago (``2h``): it means another moment each time it is read.

    >>> is_relative("2h"), is_relative(" 90m "), is_relative("2024-05-01T12:00:00Z"), is_relative("1714564800")
    (True, True, False, False)
    """
    return _DURATION.fullmatch(text.strip()) is not None


def check_resumable(
    times: Mapping[str, str | None], *, group: str | None, group_option: str = "--group", now_ms: int
) -> None:
    """Refuse a real redrive or park whose time range is relative to now unless it names its consumer group.

    ``times`` maps each option (``--since``, ``--until``) to its text as given. A run's default group is named
    after its filter, with times resolved to epoch milliseconds: run again later, ``2h`` is another moment, so
    another group, which starts from the beginning and sends every record again. An absolute time, or a group
    the operator names, makes a rerun resume where the last run stopped; but the group commits the records the
    window skips as well, so a rerun of a moving window never sends those that came into it after the last run:
    the message leads with the absolute time, the safer choice. Dry runs commit nothing: no need.

    >>> check_resumable({"--since": "2h"}, group="orders-replay", now_ms=0)  # a named group resumes
    >>> check_resumable({"--since": "2h"}, group=None, now_ms=1714564800000)
    Traceback (most recent call last):
    ...
    kafka_dlq.errors.ConfigError: --since 2024-05-01T10:00:00Z is what '2h' means now: pass that absolute time. ...
    """
    if group:
        return
    for option, text in times.items():
        if text is not None and is_relative(text):
            millis = parse_time(text, now_ms=now_ms)
            try:
                moment = datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            except (OverflowError, OSError, ValueError):  # a duration reaching before year 1
                moment = str(millis)
            raise ConfigError(
                f"{option} {moment} is what {text!r} means now: pass that absolute time. {option} {text!r} is "
                "relative to now: every run reads it anew, so a rerun would select another range under another "
                "consumer group and send every record again instead of resuming. Or name the run's group "
                f"({group_option} NAME; the same name again resumes), knowing that the group commits the records "
                "the window skips too: a rerun never sends those that have moved into the window since"
            )


def parse_offsets(text: str) -> tuple[int | None, int | None]:
    """An inclusive offset range: ``100-199``, ``100-`` (from 100 on), ``-199`` (up to 199), or ``150`` alone.

    >>> parse_offsets("100-199"), parse_offsets("100-"), parse_offsets("-199"), parse_offsets("150")
    ((100, 199), (100, None), (None, 199), (150, 150))
    """
    first, dash, last = text.strip().partition("-")
    try:
        low = int(first) if first else None
        high = int(last) if last else (low if not dash else None)
    except ValueError:
        raise ConfigError(f"offset range {text!r}: write FIRST-LAST (inclusive), FIRST-, -LAST or one offset") from None
    if low is None and high is None:
        raise ConfigError(f"offset range {text!r} names no offset: write FIRST-LAST, FIRST- or -LAST")
    return low, high


def parse_header(text: str) -> tuple[str, bytes | None]:
    """``NAME=VALUE`` (the value as UTF-8), or ``NAME`` alone for "present, whatever its value".

    >>> parse_header("tenant=acme"), parse_header("traceparent")
    (('tenant', b'acme'), ('traceparent', None))
    """
    name, equals, value = text.partition("=")
    if not name:
        raise ConfigError(f"header match {text!r} has no name: write NAME=VALUE or NAME")
    return name, value.encode() if equals else None
