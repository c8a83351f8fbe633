"""Apache Kafka's own dead letters: Connect (``__connect.errors.*``), Streams (``__streams.errors.*``, KIP-1034)
and share groups (``__dlq.errors.*``, KIP-1191). All three write UTF-8 text, numbers as decimal text.

Read from the source (repository apache/kafka):

- Connect: ``connect/runtime/src/main/java/org/apache/kafka/connect/runtime/errors/DeadLetterQueueReporter.java``.
  The DLQ record keeps the original key, value, headers and timestamp; ``populateContextHeaders`` appends
  topic, partition, offset, connector.name, task.id, stage, class.name, exception.class.name,
  exception.message (a null header when the message is null) and exception.stacktrace, and only when
  ``errors.deadletterqueue.context.headers.enable`` is on: without them a Connect dead letter is just the
  original record, and no reader can tell it from any other.
- Streams: ``streams/src/main/java/org/apache/kafka/streams/errors/internals/ExceptionHandlerUtils.java``.
  The DLQ record keeps key, value, headers and timestamp (``context.timestamp()``) and appends exception (the
  class name), message, stacktrace, topic, partition, offset. Before 4.2 shipped, the same helper in
  ``org.apache.kafka.streams.errors`` wrote ``e.toString()`` ("class: message") as the exception, and did not
  copy headers. The topic is null when the failure had no source record (a punctuation).
- Share groups: ``server/src/main/java/org/apache/kafka/server/share/dlq/ShareGroupDLQStateManager.java``. The
  broker writes topic, partition, offset, group, delivery.count (a Java short) and message ("Offset rejected by
  client." or "Offset delivery count exceeded the threshold."), copies key and value only when the group asks
  for it, never copies headers, and stamps the record with the time it wrote it.
"""

from __future__ import annotations

from kafka_dlq.formats._common import (
    INT32_MAX,
    MAX_ATTEMPTS,
    Fields,
    SourceFormat,
    coordinates,
    frozen,
    known,
    without,
)
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["CONNECT_PREFIX", "SHARE_PREFIX", "STREAMS_PREFIX", "decode_connect", "decode_share", "decode_streams"]

CONNECT_PREFIX = "__connect.errors."
STREAMS_PREFIX = "__streams.errors."
SHARE_PREFIX = "__dlq.errors."


def decode_connect(record: KafkaRecord) -> DeadLetter:
    """Read a Kafka Connect sink's dead letter; raises ``FormatError`` on bad metadata."""
    fields = Fields(record.headers)
    p = CONNECT_PREFIX
    return _dead_letter(
        record,
        fields,
        p,
        SourceFormat.CONNECT,
        failure=Failure(
            error_class=fields.text(p + "exception.class.name"),
            message=fields.text(p + "exception.message"),
            stacktrace=fields.text(p + "exception.stacktrace"),
        ),
        extra={
            "connector": fields.text(p + "connector.name"),
            "task": fields.text(p + "task.id"),
            "stage": fields.text(p + "stage"),
            "executing_class": fields.text(p + "class.name"),
        },
    )


def decode_streams(record: KafkaRecord) -> DeadLetter:
    """Read a Kafka Streams dead letter (KIP-1034); raises ``FormatError`` on bad metadata."""
    fields = Fields(record.headers)
    p = STREAMS_PREFIX
    exception = fields.text(p + "exception")
    return _dead_letter(
        record,
        fields,
        p,
        SourceFormat.STREAMS,
        failure=Failure(
            # A Java class name holds no colon: this reads both "class" (4.2) and "class: message" (pre-release).
            error_class=None if exception is None else exception.split(":", 1)[0].strip(),
            message=fields.text(p + "message"),
            stacktrace=fields.text(p + "stacktrace"),
        ),
    )


def decode_share(record: KafkaRecord) -> DeadLetter:
    """Read a share group's dead letter (KIP-1191); raises ``FormatError`` on bad metadata."""
    fields = Fields(record.headers)
    p = SHARE_PREFIX
    deliveries = fields.decimal(p + "delivery.count", high=MAX_ATTEMPTS)
    return _dead_letter(
        record,
        fields,
        p,
        SourceFormat.SHARE_GROUP,
        failure=Failure(message=fields.text(p + "message")),
        # Every delivery of a record that ends here failed: rejected, or its acquisition lock ran out.
        attempts=max(1, deliveries or 0),
        group=fields.text(p + "group"),
        # The broker stamps the dead letter with the time it wrote it: the original timestamp is unknown.
        copies_timestamp=False,
    )


def _dead_letter(
    record: KafkaRecord,
    fields: Fields,
    prefix: str,
    source_format: SourceFormat,
    *,
    failure: Failure,
    attempts: int = 1,
    group: str | None = None,
    copies_timestamp: bool = True,
    extra: dict[str, str | None] | None = None,
) -> DeadLetter:
    topic = fields.topic(prefix + "topic")
    return DeadLetter(
        original=OriginalRecord(
            topic=topic,
            partition=known(fields.decimal(prefix + "partition", low=-1, high=INT32_MAX)),
            offset=known(fields.decimal(prefix + "offset", low=-1)),
            timestamp=record.timestamp if copies_timestamp else None,
            key=record.key,
            value=record.value,
            headers=without(record.headers, lambda _, name: name.startswith(prefix)),
        ),
        failure=failure,
        attempts=attempts,
        # None of the three carries failure times. For Connect and Streams the record's timestamp is the
        # original's, so max-age rules count from when the record was made: the conservative reading.
        first_failure=record.timestamp,
        last_failure=record.timestamp,
        group=group,
        source_format=source_format,
        dlq=coordinates(record),
        extra=frozen(extra or {}),
    )
