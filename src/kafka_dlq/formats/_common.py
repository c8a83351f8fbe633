"""What every format shares: the result types, strict header reading, numbers, times and the internal error."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.records import DlqCoordinates

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_EPOCH_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: anything later is garbage, not a time."""
MAX_ATTEMPTS = 1_000_000
"""An attempt or redrive count above this is corrupt metadata, not a history (a retry a second for 11 days)."""
MAX_MESSAGE_BYTES = 4 * 1024
MAX_STACKTRACE_BYTES = 16 * 1024


class SourceFormat(StrEnum):
    """The wire format a dead letter was read from; the value is what ``DeadLetter.source_format`` holds."""

    NATIVE = "native"
    SEED_JSON = "seed-json"
    SPRING = "spring"
    SPRING_RETRY = "spring-retry"
    CONNECT = "connect"
    STREAMS = "streams"
    SHARE_GROUP = "share-group"


@dataclass(frozen=True, slots=True, kw_only=True)
class Undecodable:
    """A dead-letter record that cannot be read, and precisely why: the handler parks it with this reason.

    >>> Undecodable(reason="missing original topic (header dlq.original.topic)",
    ...             dlq=DlqCoordinates(topic="orders.dlq", partition=0, offset=7)).source_format is None
    True
    """

    reason: str
    dlq: DlqCoordinates
    source_format: SourceFormat | None = None
    """The format the record claims to be in, or None when no known format matched."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedRecord:
    """The key, value and headers to produce for a dead letter (the topic is the caller's choice)."""

    key: bytes | None
    value: bytes | None
    headers: Headers


class FormatError(Exception):
    """What is wrong with a record's dead-letter metadata. Internal: ``decode`` turns it into ``Undecodable``."""


class NotThisFormat(FormatError):
    """The record does not look like the format at all (as opposed to looking like it and being broken)."""


def coordinates(record: KafkaRecord) -> DlqCoordinates:
    return DlqCoordinates(topic=record.topic, partition=record.partition, offset=record.offset)


def show(value: object, limit: int = 64) -> str:
    """A short, printable rendering of a bad value for a reason text (a huge header must not make a huge reason)."""
    if isinstance(value, bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} bytes)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def without(headers: Headers, drop: Callable[[int, str], bool]) -> Headers:
    """The headers, in order, minus those ``drop(index, name)`` marks as metadata."""
    return tuple((name, value) for index, (name, value) in enumerate(headers) if not drop(index, name))


def frozen(extra: Mapping[str, str | None]) -> Mapping[str, str]:
    return MappingProxyType({name: value for name, value in extra.items() if value is not None})


def check_range(what: str, number: int, *, low: int = 0, high: int = INT64_MAX) -> int:
    if number < low:
        raise FormatError(f"{what} is negative: {number}" if low == 0 else f"{what} is below {low}: {number}")
    if number > high:
        raise FormatError(f"{what} is {number}, above the limit {high}")
    return number


def known(number: int | None) -> int | None:
    """Kafka writes -1 for an unknown partition, offset or timestamp."""
    return None if number is None or number < 0 else number


_DECIMAL = re.compile(rb"-?[0-9]+")


class Fields:
    """A record's headers read strictly: the last value of a repeated name wins, as in Kafka's ``lastHeader``."""

    __slots__ = ("_last",)

    def __init__(self, headers: Headers) -> None:
        self._last: dict[str, bytes | None] = dict(headers)

    def __contains__(self, name: str) -> bool:
        return name in self._last

    def raw(self, name: str) -> bytes | None:
        """The bytes of a header; None when absent or null (Kafka's null header value means "no value")."""
        return self._last.get(name)

    def text(self, name: str) -> str | None:
        raw = self._last.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"header {name} is not valid UTF-8: {show(raw)}") from None

    def topic(self, name: str) -> str:
        """The original topic: required, UTF-8, not empty."""
        if name not in self._last:
            raise FormatError(f"missing original topic (header {name})")
        topic = self.text(name)
        if topic is None:
            raise FormatError(f"header {name} is null: no original topic")
        if not topic:
            raise FormatError(f"header {name} is empty: no original topic")
        return topic

    def decimal(self, name: str, *, low: int = 0, high: int = INT64_MAX) -> int | None:
        """A number written as decimal text (ASCII digits, optional minus; no spaces, signs or underscores)."""
        raw = self._last.get(name)
        if raw is None:
            return None
        # The common case first, cheaply (this runs for several headers of every dead letter): plain ASCII digits
        # (bytes.isdigit is ASCII only), short enough, in range. Anything else takes the strict path below.
        if raw.isdigit() and len(raw) <= 20:
            number = int(raw)
            if low <= number <= high:
                return number
        if not _DECIMAL.fullmatch(raw):
            raise FormatError(f"header {name} is not a decimal integer: {show(raw)}")
        if len(raw) > 20:  # longer than any 64-bit number: refuse before int() does the work
            raise FormatError(f"header {name} is out of range: {show(raw)}")
        return check_range(f"header {name}", int(raw), low=low, high=high)

    def big_endian(self, name: str, sizes: range, *, low: int = 0, high: int = INT64_MAX) -> int | None:
        """A number written as a big-endian two's-complement integer of one of ``sizes`` bytes (Java's encodings)."""
        raw = self._last.get(name)
        if raw is None:
            return None
        if len(raw) not in sizes:
            want = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
            got = f"{len(raw)} byte{'' if len(raw) == 1 else 's'}"
            raise FormatError(f"header {name} is not a big-endian integer of {want} bytes: {got} {show(raw)}")
        return check_range(f"header {name}", int.from_bytes(raw, "big", signed=True), low=low, high=high)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECONDS_BELOW = 100_000_000_000
"""Numbers below 1e11 are epoch seconds (1e11 s is the year 5138), larger ones epoch milliseconds (1e11 ms is
1973-03-03, so only millisecond times before that are misread, and no dead letter is that old)."""


def epoch_ms(what: str, value: object) -> int | None:
    """A time as epoch milliseconds from a JSON value or header text.

    Accepted: epoch seconds (int or float, below 1e11), epoch milliseconds (from 1e11), the same as decimal
    text, and ISO-8601 text (``2024-05-01T12:00:00.5+02:00``; no offset means UTC). None stays None.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value
        try:
            value = float(text)
        except ValueError:
            return _iso_ms(what, text)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{what} is not a time: {show(value)}")
    if not math.isfinite(value) or value < 0:
        raise FormatError(f"{what} is not a plausible epoch time: {show(value)}")
    millis = value * 1000 if value < _SECONDS_BELOW else value
    if millis > MAX_EPOCH_MS:
        raise FormatError(f"{what} is not a plausible epoch time: {show(value)}")
    return round(millis)


def _iso_ms(what: str, text: str) -> int:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise FormatError(f"{what} is neither an epoch time nor ISO-8601: {show(text)}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    millis = (moment - _EPOCH) // timedelta(milliseconds=1)
    if millis < 0:
        raise FormatError(f"{what} is before 1970: {show(text)}")
    # The same upper bound as epoch numbers: "9999-12-31T23:59:59-23:59" is a valid ISO-8601 text for a moment
    # after 9999-12-31Z, which no epoch header can carry, so the dead letter could not be written back natively.
    if millis > MAX_EPOCH_MS:
        raise FormatError(f"{what} is not a plausible time (after 9999-12-31Z): {show(text)}")
    return millis


def utf8(text: str | None) -> bytes | None:
    # A Python str may hold lone surrogates (surrogateescape'd paths in an exception message): keep them visible.
    return None if text is None else text.encode("utf-8", "backslashreplace")


def capped(text: str | None, limit: int) -> bytes | None:
    """UTF-8 of ``text``, cut to at most ``limit`` bytes without splitting a character."""
    data = utf8(text)
    if data is None or len(data) <= limit:
        return data
    # A prefix of valid UTF-8 can only be broken in its last character, which "ignore" drops.
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def decimal_bytes(number: int | None) -> bytes | None:
    return None if number is None else str(number).encode("ascii")
