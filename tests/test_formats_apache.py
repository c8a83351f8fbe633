"""Apache Kafka's own dead letters: Connect, Streams (KIP-1034) and share groups (KIP-1191), built as Kafka writes
them: UTF-8 text, numbers as decimal text (String.valueOf / Integer.toString / Long.toString / Short.toString).

Sources read (repository apache/kafka):
- connect/runtime/src/main/java/org/apache/kafka/connect/runtime/errors/DeadLetterQueueReporter.java
- streams/src/main/java/org/apache/kafka/streams/errors/internals/ExceptionHandlerUtils.java
  (and its pre-release form streams/src/main/java/org/apache/kafka/streams/errors/ExceptionHandlerUtils.java,
  which wrote e.toString() as the exception)
- server/src/main/java/org/apache/kafka/server/share/dlq/ShareGroupDLQStateManager.java
"""

from __future__ import annotations

import pytest

from kafka_dlq.formats import SourceFormat, Undecodable, decode
from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord

DLQ = DlqCoordinates(topic="dlq-sink", partition=0, offset=12)
TRACE = "org.apache.kafka.connect.errors.DataException: Converting byte[] to Kafka Connect data failed\n\tat ..."


def kafka_record(
    headers: Headers, *, timestamp: int | None = 1700000000000, value: bytes | None = b"\x00\x01avro"
) -> KafkaRecord:
    return KafkaRecord(
        topic=DLQ.topic,
        partition=DLQ.partition,
        offset=DLQ.offset,
        timestamp=timestamp,
        key=b"k1",
        value=value,
        headers=headers,
    )


def decoded(record: KafkaRecord) -> DeadLetter:
    result = decode(record)
    assert isinstance(result, DeadLetter), result
    return result


def undecodable(record: KafkaRecord) -> Undecodable:
    result = decode(record)
    assert isinstance(result, Undecodable), result
    return result


CONNECT_HEADERS: Headers = (
    ("__connect.errors.topic", b"orders"),
    ("__connect.errors.partition", b"4"),
    ("__connect.errors.offset", b"1500"),
    ("__connect.errors.connector.name", b"orders-jdbc-sink"),
    ("__connect.errors.task.id", b"2"),
    ("__connect.errors.stage", b"VALUE_CONVERTER"),
    ("__connect.errors.class.name", b"io.confluent.connect.avro.AvroConverter"),
    ("__connect.errors.exception.class.name", b"org.apache.kafka.connect.errors.DataException"),
    ("__connect.errors.exception.message", b"Converting byte[] to Kafka Connect data failed"),
    ("__connect.errors.exception.stacktrace", TRACE.encode()),
)


def test_given_a_connect_sink_dead_letter_when_decoded_then_origin_failure_and_connector_are_read():
    # The reporter copies key, value, headers and timestamp of the original and appends its context headers.
    record = kafka_record((("schema-id", b"\x00\x00\x00\x07"), *CONNECT_HEADERS))

    dead_letter = decoded(record)

    assert dead_letter.original == OriginalRecord(
        topic="orders",
        partition=4,
        offset=1500,
        timestamp=1700000000000,
        key=b"k1",
        value=b"\x00\x01avro",
        headers=(("schema-id", b"\x00\x00\x00\x07"),),
    )
    assert dead_letter.failure == Failure(
        error_class="org.apache.kafka.connect.errors.DataException",
        message="Converting byte[] to Kafka Connect data failed",
        stacktrace=TRACE,
    )
    assert dict(dead_letter.extra) == {
        "connector": "orders-jdbc-sink",
        "task": "2",
        "stage": "VALUE_CONVERTER",
        "executing_class": "io.confluent.connect.avro.AvroConverter",
    }
    assert dead_letter.attempts == 1
    assert dead_letter.first_failure == dead_letter.last_failure == 1700000000000
    assert dead_letter.source_format is SourceFormat.CONNECT
    assert dead_letter.dlq == DLQ


def test_given_an_exception_without_message_when_decoded_then_connects_null_header_is_no_message():
    # toBytes(null) returns null: the header is there with a null value.
    headers = tuple((n, None if n == "__connect.errors.exception.message" else v) for n, v in CONNECT_HEADERS)

    assert decoded(kafka_record(headers)).failure.message is None


STREAMS_HEADERS: Headers = (
    ("__streams.errors.exception", b"org.apache.kafka.common.errors.SerializationException"),
    ("__streams.errors.message", b"Size of data received by IntegerDeserializer is not 4"),
    ("__streams.errors.stacktrace", b"org.apache.kafka.common.errors.SerializationException: Size...\n\tat ..."),
    ("__streams.errors.topic", b"clicks"),
    ("__streams.errors.partition", b"7"),
    ("__streams.errors.offset", b"31337"),
)


def test_given_a_kafka_streams_dead_letter_when_decoded_then_origin_and_failure_are_read():
    record = kafka_record((("tenant", b"acme"), *STREAMS_HEADERS), timestamp=1699999990000)

    dead_letter = decoded(record)

    assert dead_letter.original == OriginalRecord(
        topic="clicks",
        partition=7,
        offset=31337,
        timestamp=1699999990000,  # context.timestamp(): the original record's
        key=b"k1",
        value=b"\x00\x01avro",
        headers=(("tenant", b"acme"),),
    )
    assert dead_letter.failure.error_class == "org.apache.kafka.common.errors.SerializationException"
    assert dead_letter.failure.message == "Size of data received by IntegerDeserializer is not 4"
    assert dead_letter.attempts == 1
    assert dead_letter.source_format is SourceFormat.STREAMS


def test_given_a_pre_release_streams_exception_header_when_decoded_then_the_class_is_read_from_to_string():
    headers = (
        ("__streams.errors.exception", b"java.lang.IllegalArgumentException: negative count"),
        *STREAMS_HEADERS[1:],
    )

    assert decoded(kafka_record(headers)).failure.error_class == "java.lang.IllegalArgumentException"


def test_given_unknown_partition_and_offset_when_decoded_then_kafkas_minus_one_means_unknown():
    headers = (
        ("__streams.errors.topic", b"clicks"),
        ("__streams.errors.partition", b"-1"),
        ("__streams.errors.offset", b"-1"),
    )

    dead_letter = decoded(kafka_record(headers))

    assert (dead_letter.original.partition, dead_letter.original.offset) == (None, None)


SHARE_HEADERS: Headers = (
    ("__dlq.errors.topic", b"payments"),
    ("__dlq.errors.partition", b"2"),
    ("__dlq.errors.offset", b"41"),
    ("__dlq.errors.group", b"payment-workers"),
    ("__dlq.errors.delivery.count", b"5"),
    ("__dlq.errors.message", b"Offset delivery count exceeded the threshold."),
)


def test_given_a_share_group_dead_letter_when_decoded_then_deliveries_are_the_attempts():
    dead_letter = decoded(kafka_record(SHARE_HEADERS, timestamp=1700000077000))

    assert dead_letter.original == OriginalRecord(
        topic="payments",
        partition=2,
        offset=41,
        timestamp=None,  # the broker stamps the dead letter with the time it wrote it
        key=b"k1",
        value=b"\x00\x01avro",
        headers=(),
    )
    assert dead_letter.failure == Failure(message="Offset delivery count exceeded the threshold.")
    assert dead_letter.attempts == 5
    assert dead_letter.group == "payment-workers"
    assert dead_letter.first_failure == dead_letter.last_failure == 1700000077000
    assert dead_letter.source_format is SourceFormat.SHARE_GROUP


def test_given_a_share_group_that_does_not_copy_records_when_decoded_then_key_and_value_are_null():
    dead_letter = decoded(kafka_record(SHARE_HEADERS[:4], value=None))

    assert dead_letter.original.value is None
    assert dead_letter.attempts == 1


@pytest.mark.parametrize(
    ("headers", "source_format", "reason"),
    [
        (CONNECT_HEADERS[1:], SourceFormat.CONNECT, "missing original topic (header __connect.errors.topic)"),
        (
            (("__connect.errors.topic", b"orders"), ("__connect.errors.partition", b"four")),
            SourceFormat.CONNECT,
            "header __connect.errors.partition is not a decimal integer: b'four'",
        ),
        (
            (("__connect.errors.topic", b"orders"), ("__connect.errors.offset", b"-7")),
            SourceFormat.CONNECT,
            "header __connect.errors.offset is below -1: -7",
        ),
        (
            (("__connect.errors.topic", b"orders"), ("__connect.errors.exception.stacktrace", b"\xc0\xaf")),
            SourceFormat.CONNECT,
            "header __connect.errors.exception.stacktrace is not valid UTF-8",
        ),
        (
            (("__streams.errors.topic", None), ("__streams.errors.message", b"punctuation failed")),
            SourceFormat.STREAMS,
            "header __streams.errors.topic is null: no original topic",
        ),
        (
            (("__dlq.errors.topic", b"payments"), ("__dlq.errors.delivery.count", b"-1")),
            SourceFormat.SHARE_GROUP,
            "header __dlq.errors.delivery.count is negative: -1",
        ),
        (
            (("__dlq.errors.topic", b"payments"), ("__dlq.errors.delivery.count", b"99999999")),
            SourceFormat.SHARE_GROUP,
            "header __dlq.errors.delivery.count is 99999999, above the limit 1000000",
        ),
        (
            (("__dlq.errors.topic", b"payments"), ("__dlq.errors.partition", b"\x00\x00\x00\x02")),
            SourceFormat.SHARE_GROUP,
            "header __dlq.errors.partition is not a decimal integer",
        ),
    ],
)
def test_given_bad_apache_headers_when_decoded_then_the_record_is_undecodable_with_a_precise_reason(
    headers, source_format, reason
):
    result = undecodable(kafka_record(headers))

    assert result.reason.startswith(reason)
    assert result.source_format is source_format
