"""kafka-dlq's own format: the original key, value and headers plus ``dlq.*`` headers (DESIGN.md, "Records and
formats"). All values are UTF-8 text, numbers and epoch-millisecond times as decimal text."""

from __future__ import annotations

import dataclasses

from kafka_dlq.formats import spring
from kafka_dlq.formats._common import (
    INT32_MAX,
    MAX_ATTEMPTS,
    MAX_EPOCH_MS,
    MAX_MESSAGE_BYTES,
    MAX_STACKTRACE_BYTES,
    EncodedRecord,
    Fields,
    FormatError,
    SourceFormat,
    capped,
    coordinates,
    decimal_bytes,
    show,
    utf8,
    without,
)
from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["CARRIED", "HEADERS", "decode_native", "encode_native"]

TOPIC = "dlq.original.topic"
PARTITION = "dlq.original.partition"
OFFSET = "dlq.original.offset"
TIMESTAMP = "dlq.original.timestamp"
GROUP = "dlq.original.group"
ERROR_CLASS = "dlq.error.class"
ERROR_MESSAGE = "dlq.error.message"
ERROR_STACKTRACE = "dlq.error.stacktrace"
ATTEMPTS = "dlq.attempts"
FIRST_FAILURE = "dlq.first.failure"
LAST_FAILURE = "dlq.last.failure"
REASON = "dlq.reason"
REDRIVE_COUNT = "dlq.redrive.count"
HEADERS = frozenset(
    {
        TOPIC,
        PARTITION,
        OFFSET,
        TIMESTAMP,
        GROUP,
        ERROR_CLASS,
        ERROR_MESSAGE,
        ERROR_STACKTRACE,
        ATTEMPTS,
        FIRST_FAILURE,
        LAST_FAILURE,
        REASON,
        REDRIVE_COUNT,
    }
)
"""Every native metadata header."""
CARRIED = frozenset({ATTEMPTS, FIRST_FAILURE, REDRIVE_COUNT})
"""The headers a redrive sends home with the original record (its failure history and the loop guard). They do
not make a record a dead letter: a system that keeps its headers (a plain forwarder, the seed publisher's
envelope, Spring, Connect) carries them into its own dead letter when the record fails again."""


def decode_native(record: KafkaRecord) -> DeadLetter:
    """Read a native dead letter; raises ``FormatError`` saying precisely what is wrong."""
    fields = Fields(record.headers)
    topic = fields.topic(TOPIC)
    reason_text = fields.text(REASON)
    try:
        reason = None if reason_text is None else Reason(reason_text)
    except ValueError:
        raise FormatError(f"header {REASON} is not one of {', '.join(Reason)}: {show(reason_text)}") from None
    attempts = fields.decimal(ATTEMPTS, high=MAX_ATTEMPTS)
    first_failure = fields.decimal(FIRST_FAILURE, high=MAX_EPOCH_MS)
    last_failure = fields.decimal(LAST_FAILURE, high=MAX_EPOCH_MS)
    return DeadLetter(
        original=OriginalRecord(
            topic=topic,
            partition=fields.decimal(PARTITION, high=INT32_MAX),
            offset=fields.decimal(OFFSET),
            timestamp=fields.decimal(TIMESTAMP, high=MAX_EPOCH_MS),
            key=record.key,
            value=record.value,
            headers=_original_headers(record.headers),
        ),
        failure=Failure(
            error_class=fields.text(ERROR_CLASS),
            message=fields.text(ERROR_MESSAGE),
            stacktrace=fields.text(ERROR_STACKTRACE),
        ),
        attempts=1 if attempts is None else attempts,
        first_failure=record.timestamp if first_failure is None else first_failure,
        last_failure=record.timestamp if last_failure is None else last_failure,
        group=fields.text(GROUP),
        reason=reason,
        redrive_count=fields.decimal(REDRIVE_COUNT, high=MAX_ATTEMPTS) or 0,
        source_format=_NATIVE,
        dlq=coordinates(record),
    )


_NATIVE = SourceFormat.NATIVE  # looked up once: an enum member's lookup is not free, and this runs per record


def with_carried(dead_letter: DeadLetter, headers: Headers) -> DeadLetter:
    """``dead_letter``, read in another format, with the history its record carried home from a redrive.

    Redrive sends a record back with ``dlq.attempts``, ``dlq.first.failure`` and ``dlq.redrive.count``; when it
    fails again in a system that keeps its headers, that system's dead letter carries them among the original
    ones. They are ours whatever format the record failed in next: the attempts are the carried ones plus that
    system's own (capped at ``MAX_ATTEMPTS``), the first failure is the earlier of the two, the redrive count is
    the carried one; and none of the three stays an original header. A corrupt one raises ``FormatError``.
    """
    fields = Fields(headers)
    if not any(name in fields for name in CARRIED):
        return dead_letter
    attempts = fields.decimal(ATTEMPTS, high=MAX_ATTEMPTS)
    first_failure = fields.decimal(FIRST_FAILURE, high=MAX_EPOCH_MS)
    count = fields.decimal(REDRIVE_COUNT, high=MAX_ATTEMPTS)
    original_headers = without(dead_letter.original.headers, lambda _, name: name in CARRIED)
    return dataclasses.replace(
        dead_letter,
        original=dataclasses.replace(dead_letter.original, headers=original_headers),
        attempts=dead_letter.attempts if attempts is None else min(MAX_ATTEMPTS, attempts + dead_letter.attempts),
        first_failure=earlier(first_failure, dead_letter.first_failure),
        redrive_count=dead_letter.redrive_count if count is None else count,
    )


def earlier(first: int | None, other: int | None) -> int | None:
    """The earlier of two times, either of which may be unknown."""
    if first is None:
        return other
    return first if other is None else min(first, other)


def _original_headers(headers: Headers) -> Headers:
    # The encoder appends its headers after the original ones, starting with dlq.original.topic. kafka_dlt-*
    # headers after that point are our Spring-compatible copy; before it they belong to the original record
    # (say, one Spring dead-lettered earlier) and are kept byte for byte.
    start = len(headers)
    for index in range(len(headers) - 1, -1, -1):
        if headers[index][0] == TOPIC:
            start = index
            break
    kept = []
    for index, header in enumerate(headers):
        name = header[0]
        if name in HEADERS or (index > start and name.startswith(spring.DLT_PREFIX)):
            continue
        kept.append(header)
    return tuple(kept)


def encode_native(dead_letter: DeadLetter, *, spring_compatible: bool = False) -> EncodedRecord:
    """The record to produce for ``dead_letter`` in the native format: its original key and value, its original
    headers (less any stale ``dlq.*`` ones), then the ``dlq.*`` headers (message capped at 4 KiB, stack trace at
    16 KiB of UTF-8, never splitting a character; ``dlq.reason`` only once parked).

    ``spring_compatible=True`` also appends the ``kafka_dlt-*`` headers Spring's ``DeadLetterPublishingRecoverer``
    writes, so Java tools read it too; ``decode`` still reads it as native and gives back the same dead letter.
    The format-specific ``extra`` has no native header and is not written.

    >>> from kafka_dlq.records import OriginalRecord
    >>> encoded = encode_native(DeadLetter(original=OriginalRecord(topic="orders", value=b"{}"), attempts=2))
    >>> dict(encoded.headers)["dlq.attempts"]
    b'2'
    """
    original, failure = dead_letter.original, dead_letter.failure
    pairs = (
        (TOPIC, utf8(original.topic)),
        (PARTITION, decimal_bytes(original.partition)),
        (OFFSET, decimal_bytes(original.offset)),
        (TIMESTAMP, decimal_bytes(original.timestamp)),
        (GROUP, utf8(dead_letter.group)),
        (ERROR_CLASS, utf8(failure.error_class)),
        (ERROR_MESSAGE, capped(failure.message, MAX_MESSAGE_BYTES)),
        (ERROR_STACKTRACE, capped(failure.stacktrace, MAX_STACKTRACE_BYTES)),
        (ATTEMPTS, decimal_bytes(dead_letter.attempts)),
        (FIRST_FAILURE, decimal_bytes(dead_letter.first_failure)),
        (LAST_FAILURE, decimal_bytes(dead_letter.last_failure)),
        (REASON, utf8(dead_letter.reason)),
        (REDRIVE_COUNT, decimal_bytes(dead_letter.redrive_count)),
    )
    # Native metadata among the original headers is stale (a failure before a redrive) and would be read back
    # where a fresh header is absent: it goes, as decode_native would drop it anyway.
    fresh = tuple((name, value) for name, value in pairs if value is not None)
    headers = without(original.headers, lambda _, name: name in HEADERS) + fresh
    if spring_compatible:
        headers += spring.spring_headers(dead_letter)
    return EncodedRecord(key=original.key, value=original.value, headers=headers)
