"""Spring Kafka's dead letters: ``DeadLetterPublishingRecoverer`` (``kafka_dlt-*``) and retry topics (``kafka_*``).

Names and encodings are read from Spring's source (repository spring-projects/spring-kafka), not from blogs:

- ``spring-kafka/src/main/java/org/springframework/kafka/support/KafkaHeaders.java``: the names. The cause header
  is ``...exception-cause-fqcn``; key (deserialization) failures use ``...key-exception-fqcn/-message/-stacktrace``.
- ``spring-kafka/src/main/java/org/springframework/kafka/listener/DeadLetterPublishingRecoverer.java``
  (``maybeAddOriginalHeaders``, ``addExceptionInfoHeaders``): topic, timestamp type, group, class names, message and
  stack trace are UTF-8 text; partition is ``ByteBuffer.putInt`` (4 bytes, big-endian); offset and timestamp are
  ``putLong`` (8 bytes, big-endian). Original headers are appended (``appendOriginalHeaders`` is true by default), so
  a name may repeat: like Spring, we read the last one. The record keeps the failed record's key, value and headers.
- ``spring-kafka/src/main/java/org/springframework/kafka/retrytopic/RetryTopicPublishingRecoverer.java``: retry
  topics write the same encodings under ``kafka_original-*`` and ``kafka_exception-*``.
- ``spring-kafka/src/main/java/org/springframework/kafka/retrytopic/DeadLetterPublishingRecovererFactory.java``:
  ``retry_topic-attempts`` is ``ByteBuffer.putInt(attempts + 1)`` (4 bytes) in current versions and
  ``BigInteger.toByteArray()`` (1 byte for small counts) in 2.7. ``getAttempts`` reads exactly those two sizes:
  1 byte as ``Byte.toUnsignedInt`` ("backwards compatibility"), 4 bytes as ``ByteBuffer.getInt``; any other size
  is not an attempt count to Spring, nor to us. ``retry_topic-original-timestamp`` and ``-backoff-timestamp`` are
  ``BigInteger.toByteArray()`` (minimal two's complement, 1 to 8 bytes) in 2.7 and now alike, never text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass

from kafka_dlq.formats._common import (
    INT32_MAX,
    INT64_MIN,
    MAX_ATTEMPTS,
    MAX_EPOCH_MS,
    MAX_MESSAGE_BYTES,
    MAX_STACKTRACE_BYTES,
    Fields,
    FormatError,
    SourceFormat,
    capped,
    check_range,
    coordinates,
    epoch_ms,
    frozen,
    known,
    show,
    utf8,
    without,
)
from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["DLT", "DLT_PREFIX", "RETRY", "RETRY_HEADERS", "decode_spring", "decode_spring_retry", "spring_headers"]


@dataclass(frozen=True, slots=True)
class SpringNames:
    """One family of Spring's header names (``HeaderNames`` in the recoverer)."""

    topic: str
    partition: str
    offset: str
    timestamp: str
    timestamp_type: str
    group: str
    exception: str
    cause: str
    message: str
    stacktrace: str
    key_exception: str
    key_message: str
    key_stacktrace: str


def _names(prefix: str) -> SpringNames:
    return SpringNames(
        topic=f"{prefix}original-topic",
        partition=f"{prefix}original-partition",
        offset=f"{prefix}original-offset",
        timestamp=f"{prefix}original-timestamp",
        timestamp_type=f"{prefix}original-timestamp-type",
        group=f"{prefix}original-consumer-group",
        exception=f"{prefix}exception-fqcn",
        cause=f"{prefix}exception-cause-fqcn",
        message=f"{prefix}exception-message",
        stacktrace=f"{prefix}exception-stacktrace",
        key_exception=f"{prefix}key-exception-fqcn",
        key_message=f"{prefix}key-exception-message",
        key_stacktrace=f"{prefix}key-exception-stacktrace",
    )


DLT_PREFIX = "kafka_dlt-"
DLT = _names(DLT_PREFIX)
"""``KafkaHeaders.DLT_*``: what a plain ``DeadLetterPublishingRecoverer`` writes."""
RETRY = _names("kafka_")
"""``KafkaHeaders.ORIGINAL_*`` / ``EXCEPTION_*``: what the retry-topic recoverer writes, into retry topics and DLT."""
ATTEMPTS = "retry_topic-attempts"
ORIGINAL_TIMESTAMP = "retry_topic-original-timestamp"
BACKOFF_TIMESTAMP = "retry_topic-backoff-timestamp"
RETRY_HEADERS = frozenset((*astuple(RETRY), ATTEMPTS, ORIGINAL_TIMESTAMP, BACKOFF_TIMESTAMP))


def decode_spring(record: KafkaRecord) -> DeadLetter:
    """Read a ``DeadLetterPublishingRecoverer`` record (``kafka_dlt-*``); raises ``FormatError`` on bad metadata."""
    return _decode(record, DLT, SourceFormat.SPRING, lambda _, name: name.startswith(DLT_PREFIX), retry_topic=False)


def decode_spring_retry(record: KafkaRecord) -> DeadLetter:
    """Read a retry-topic record (``kafka_original-*``, ``retry_topic-*``); raises ``FormatError`` on bad metadata."""
    return _decode(record, RETRY, SourceFormat.SPRING_RETRY, lambda _, name: name in RETRY_HEADERS, retry_topic=True)


def _decode(
    record: KafkaRecord,
    names: SpringNames,
    source_format: SourceFormat,
    metadata: Callable[[int, str], bool],
    *,
    retry_topic: bool,
) -> DeadLetter:
    fields = Fields(record.headers)
    topic = fields.topic(names.topic)
    timestamp = known(fields.big_endian(names.timestamp, range(8, 9), low=INT64_MIN, high=MAX_EPOCH_MS))
    attempts = 1
    if retry_topic:
        if timestamp is None:
            timestamp = _bigint_time(fields, ORIGINAL_TIMESTAMP)
        # The factory writes attempts + 1, where attempts is the delivery that just failed (1 on the main topic):
        # a record sent to the DLT after its 3rd failed delivery carries 4 (DefaultDestinationTopicResolver
        # sends to the DLT once attempt < maxAttempts is false).
        header = _attempts_header(fields)
        attempts = 1 if header is None else max(1, header - 1)
    # A key deserialization failure writes key-exception-* (but the shared cause header); otherwise exception-*.
    value_side = names.exception in fields
    outer = fields.text(names.exception if value_side else names.key_exception)
    # Spring wraps every listener exception in ListenerExecutionFailedException: the root cause is the class that
    # says what went wrong, so it is the one to classify and group by; the wrapper is kept in extra.
    error_class = fields.text(names.cause) or outer
    return DeadLetter(
        original=OriginalRecord(
            topic=topic,
            partition=fields.big_endian(names.partition, range(4, 5), high=INT32_MAX),
            offset=fields.big_endian(names.offset, range(8, 9)),
            timestamp=timestamp,
            key=record.key,
            value=record.value,
            headers=without(record.headers, metadata),
        ),
        failure=Failure(
            error_class=error_class,
            message=fields.text(names.message if value_side else names.key_message),
            stacktrace=fields.text(names.stacktrace if value_side else names.key_stacktrace),
        ),
        attempts=attempts,
        # Spring carries no failure times; the recoverer leaves the dead-letter record's timestamp to the producer,
        # so it is the time of the last failure.
        first_failure=record.timestamp,
        last_failure=record.timestamp,
        group=fields.text(names.group),
        source_format=source_format,
        dlq=coordinates(record),
        extra=frozen(
            {
                "timestamp_type": fields.text(names.timestamp_type),
                "exception_fqcn": outer if outer != error_class else None,
                "failed_part": None if value_side or outer is None else "key",
            }
        ),
    )


def _attempts_header(fields: Fields) -> int | None:
    # DeadLetterPublishingRecovererFactory.getAttempts: one byte is read unsigned (2.7's BigInteger bytes for a
    # count below 128), four bytes as a signed int (putInt); Spring takes no other size, so neither do we: a 2- or
    # 3-byte value is not something Spring wrote, and reading it as a number would invent a history.
    raw = fields.raw(ATTEMPTS)
    if raw is None:
        return None
    if len(raw) == 1:
        return raw[0]
    if len(raw) == 4:
        return check_range(f"header {ATTEMPTS}", int.from_bytes(raw, "big", signed=True), high=MAX_ATTEMPTS + 1)
    got = f"{len(raw)} byte{'' if len(raw) == 1 else 's'}"
    raise FormatError(f"header {ATTEMPTS} is not a big-endian integer of 1 or 4 bytes: {got} {show(raw)}")


def _bigint_time(fields: Fields, name: str) -> int | None:
    raw = fields.raw(name)
    if raw is not None and len(raw) > 8:
        # No Spring release writes this (2.7 and current both write BigInteger bytes, at most 8 for a long), but
        # the pre-2.7 retry-topic prototype formatted its timestamp header as ISO-8601 and custom recoverers write
        # decimal text: reading text costs nothing and does not park a good record.
        return epoch_ms(f"header {name}", fields.text(name))
    return known(fields.big_endian(name, range(1, 9), low=INT64_MIN, high=MAX_EPOCH_MS))


def spring_headers(dead_letter: DeadLetter) -> Headers:
    """The ``kafka_dlt-*`` headers Spring's recoverer would write for ``dead_letter``, encoded as Spring encodes them.

    Java services and tools that read Spring's dead letters can then read ours. The message and stack trace are
    capped as in the native format, so either set of headers tells the same story. Like the recoverer
    (``maybeAddOriginalHeaders``), it always writes ``kafka_dlt-original-timestamp-type``.
    """
    original, failure = dead_letter.original, dead_letter.failure
    pairs = (
        (DLT.topic, utf8(original.topic)),
        (DLT.partition, None if original.partition is None else original.partition.to_bytes(4, "big", signed=True)),
        (DLT.offset, None if original.offset is None else original.offset.to_bytes(8, "big", signed=True)),
        (DLT.timestamp, None if original.timestamp is None else original.timestamp.to_bytes(8, "big", signed=True)),
        (DLT.timestamp_type, _timestamp_type(dead_letter).encode("utf-8")),
        (DLT.group, utf8(dead_letter.group)),
        # Spring names the root cause in cause-fqcn; an exception without a cause is its own root.
        (DLT.exception, utf8(failure.error_class)),
        (DLT.cause, utf8(failure.error_class)),
        (DLT.message, capped(failure.message, MAX_MESSAGE_BYTES)),
        (DLT.stacktrace, capped(failure.stacktrace, MAX_STACKTRACE_BYTES)),
    )
    return tuple((name, value) for name, value in pairs if value is not None)


_TIMESTAMP_TYPES = frozenset({"CreateTime", "LogAppendTime", "NoTimestampType"})
"""``org.apache.kafka.common.record.TimestampType``'s names, which its ``toString()`` returns."""


def _timestamp_type(dead_letter: DeadLetter) -> str:
    # DeadLetterPublishingRecoverer writes record.timestampType().toString() as UTF-8 text. A dead letter read
    # from Spring keeps the type it was given; otherwise a record with a timestamp is taken as CreateTime (the
    # broker's default message.timestamp.type), and one without as NoTimestampType.
    carried = dead_letter.extra.get("timestamp_type")
    if carried in _TIMESTAMP_TYPES:
        return carried
    return "NoTimestampType" if dead_letter.original.timestamp is None else "CreateTime"
