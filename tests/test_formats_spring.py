"""Spring Kafka's dead letters, built byte for byte as Spring writes them.

Sources read (repository spring-projects/spring-kafka):
- spring-kafka/src/main/java/org/springframework/kafka/support/KafkaHeaders.java (header names)
- spring-kafka/src/main/java/org/springframework/kafka/listener/DeadLetterPublishingRecoverer.java
  (ByteBuffer.putInt for the partition, putLong for offset and timestamp, UTF-8 for text)
- spring-kafka/src/main/java/org/springframework/kafka/retrytopic/RetryTopicPublishingRecoverer.java
  (kafka_original-* / kafka_exception-* names for retry topics)
- spring-kafka/src/main/java/org/springframework/kafka/retrytopic/DeadLetterPublishingRecovererFactory.java
  (retry_topic-attempts: putInt(attempts + 1), formerly BigInteger.toByteArray(); retry_topic-*-timestamp:
  BigInteger.toByteArray())
"""

from __future__ import annotations

import struct

import pytest

from kafka_dlq.formats import SourceFormat, Undecodable, decode
from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord

DLQ = DlqCoordinates(topic="orders-dlt", partition=3, offset=9)
STACK = "org.springframework.kafka.listener.ListenerExecutionFailedException: Listener failed\n\tat ..."


def big_integer(number: int) -> bytes:
    """Java's BigInteger.toByteArray(): minimal big-endian two's complement."""
    return number.to_bytes((number.bit_length() + 8) // 8, "big", signed=True)


def spring_record(headers: Headers, *, timestamp: int | None = 1700000050000) -> KafkaRecord:
    return KafkaRecord(
        topic=DLQ.topic,
        partition=DLQ.partition,
        offset=DLQ.offset,
        timestamp=timestamp,
        key=b"order-1",
        value=b'{"total":12}',
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


DLT_HEADERS: Headers = (
    ("kafka_dlt-exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
    ("kafka_dlt-exception-cause-fqcn", b"java.lang.IllegalStateException"),
    ("kafka_dlt-exception-message", b"Listener failed; total must be positive"),
    ("kafka_dlt-exception-stacktrace", STACK.encode()),
    ("kafka_dlt-original-topic", b"orders"),
    ("kafka_dlt-original-partition", struct.pack(">i", 3)),
    ("kafka_dlt-original-offset", struct.pack(">q", 4711)),
    ("kafka_dlt-original-timestamp", struct.pack(">q", 1700000000000)),
    ("kafka_dlt-original-timestamp-type", b"CreateTime"),
    ("kafka_dlt-original-consumer-group", b"billing"),
)


def replaced(headers: Headers, name: str, value: bytes | None) -> Headers:
    return tuple((n, value if n == name else v) for n, v in headers)


def test_given_a_dead_letter_publishing_recoverer_record_when_decoded_then_its_story_is_read():
    record = spring_record((("traceparent", b"00-abc-01"), *DLT_HEADERS))

    dead_letter = decoded(record)

    assert dead_letter.original == OriginalRecord(
        topic="orders",
        partition=3,
        offset=4711,
        timestamp=1700000000000,
        key=b"order-1",
        value=b'{"total":12}',
        headers=(("traceparent", b"00-abc-01"),),
    )
    # The root cause names the failure; Spring's wrapper is kept aside.
    assert dead_letter.failure == Failure(
        error_class="java.lang.IllegalStateException",
        message="Listener failed; total must be positive",
        stacktrace=STACK,
    )
    assert dict(dead_letter.extra) == {
        "timestamp_type": "CreateTime",
        "exception_fqcn": "org.springframework.kafka.listener.ListenerExecutionFailedException",
    }
    assert dead_letter.group == "billing"
    assert dead_letter.attempts == 1
    assert dead_letter.first_failure == dead_letter.last_failure == 1700000050000
    assert dead_letter.source_format is SourceFormat.SPRING
    assert dead_letter.dlq == DLQ


def test_given_a_record_dead_lettered_twice_when_decoded_then_the_last_original_headers_win_like_springs_lastheader():
    # appendOriginalHeaders is true by default: a second recoverer appends a second set.
    headers = (
        *DLT_HEADERS,
        ("kafka_dlt-original-topic", b"orders-dlt"),
        ("kafka_dlt-original-offset", struct.pack(">q", 9)),
    )

    dead_letter = decoded(spring_record(headers))

    assert (dead_letter.original.topic, dead_letter.original.offset) == ("orders-dlt", 9)
    assert dead_letter.original.headers == ()


def test_given_no_timestamp_on_the_original_when_decoded_then_the_original_timestamp_is_unknown():
    record = spring_record(replaced(DLT_HEADERS, "kafka_dlt-original-timestamp", struct.pack(">q", -1)))

    assert decoded(record).original.timestamp is None


def test_given_a_key_deserialization_failure_when_decoded_then_the_key_exception_headers_tell_the_failure():
    # addExceptionInfoHeaders(isKey=true) writes key-exception-* but the shared exception-cause-fqcn.
    headers = (
        ("kafka_dlt-key-exception-fqcn", b"org.springframework.kafka.support.serializer.DeserializationException"),
        ("kafka_dlt-exception-cause-fqcn", b"org.apache.kafka.common.errors.SerializationException"),
        ("kafka_dlt-key-exception-message", b"failed to deserialize; bad key"),
        ("kafka_dlt-key-exception-stacktrace", b"...stack..."),
        ("kafka_dlt-original-topic", b"orders"),
    )

    dead_letter = decoded(spring_record(headers))

    assert dead_letter.failure == Failure(
        error_class="org.apache.kafka.common.errors.SerializationException",
        message="failed to deserialize; bad key",
        stacktrace="...stack...",
    )
    assert dead_letter.extra["failed_part"] == "key"


RETRY_HEADERS: Headers = (
    ("kafka_original-topic", b"orders"),
    ("kafka_original-partition", struct.pack(">i", 1)),
    ("kafka_original-offset", struct.pack(">q", 99)),
    ("kafka_original-timestamp", struct.pack(">q", 1700000000000)),
    ("kafka_original-timestamp-type", b"CreateTime"),
    ("kafka_original-consumer-group", b"billing"),
    ("retry_topic-original-timestamp", big_integer(1700000000000)),
    ("retry_topic-attempts", struct.pack(">i", 2)),
    ("retry_topic-backoff-timestamp", big_integer(1700000001000)),
    ("retry_topic-original-timestamp", big_integer(1700000000000)),
    ("retry_topic-attempts", struct.pack(">i", 3)),
    ("retry_topic-backoff-timestamp", big_integer(1700000003000)),
    ("kafka_exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
    ("kafka_exception-cause-fqcn", b"java.lang.IllegalStateException"),
    ("kafka_exception-message", b"Listener failed; boom"),
    ("kafka_exception-stacktrace", STACK.encode()),
    ("retry_topic-original-timestamp", big_integer(1700000000000)),
    ("retry_topic-attempts", struct.pack(">i", 4)),
    ("retry_topic-backoff-timestamp", big_integer(1700000006000)),
)
"""A record on the DLT after three failed deliveries (main topic, retry-0, retry-1), with the factory's default
retainAllRetryHeaderValues=true: every hop appended its retry_topic-* values."""


def test_given_a_retry_topic_dlt_record_when_decoded_then_the_main_topic_record_and_failed_attempts_are_read():
    dead_letter = decoded(spring_record((("traceparent", b"00-abc-01"), *RETRY_HEADERS)))

    assert dead_letter.original == OriginalRecord(
        topic="orders",
        partition=1,
        offset=99,
        timestamp=1700000000000,
        key=b"order-1",
        value=b'{"total":12}',
        headers=(("traceparent", b"00-abc-01"),),
    )
    # The last hop wrote attempts + 1 = 4 after the third delivery failed.
    assert dead_letter.attempts == 3
    assert dead_letter.failure.error_class == "java.lang.IllegalStateException"
    assert dead_letter.failure.message == "Listener failed; boom"
    assert dead_letter.group == "billing"
    assert dead_letter.source_format is SourceFormat.SPRING_RETRY


def test_given_spring_2_7s_one_byte_attempts_when_decoded_then_it_is_read():
    # Spring 2.7 wrote BigInteger.valueOf(attempts + 1).toByteArray(); current versions still read one byte.
    record = spring_record((("kafka_original-topic", b"orders"), ("retry_topic-attempts", big_integer(3))))

    assert decoded(record).attempts == 2


def test_given_a_one_byte_attempts_count_above_127_when_decoded_then_it_is_read_unsigned_as_spring_does():
    # DeadLetterPublishingRecovererFactory.getAttempts: Byte.toUnsignedInt(value[0]) for a 1-byte header.
    record = spring_record((("kafka_original-topic", b"orders"), ("retry_topic-attempts", b"\xc8")))

    assert decoded(record).attempts == 199


def test_given_no_original_timestamp_header_when_decoded_then_retry_topics_own_original_timestamp_is_used():
    headers = (("kafka_original-topic", b"orders"), ("retry_topic-original-timestamp", big_integer(1700000000123)))

    assert decoded(spring_record(headers)).original.timestamp == 1700000000123


def test_given_an_original_timestamp_written_as_text_when_decoded_then_it_is_read():
    headers = (("kafka_original-topic", b"orders"), ("retry_topic-original-timestamp", b"2023-11-14T22:13:20Z"))

    assert decoded(spring_record(headers)).original.timestamp == 1700000000000


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-partition", b"\x00\x00\x03"),
            "header kafka_dlt-original-partition is not a big-endian integer of 4 bytes: 3 bytes b'\\x00\\x00\\x03'",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-partition", struct.pack(">q", 3)),
            "header kafka_dlt-original-partition is not a big-endian integer of 4 bytes: 8 bytes",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-partition", b"3"),
            "header kafka_dlt-original-partition is not a big-endian integer of 4 bytes: 1 byte b'3'",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-partition", struct.pack(">i", -2)),
            "header kafka_dlt-original-partition is negative: -2",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-offset", struct.pack(">i", 4711)),
            "header kafka_dlt-original-offset is not a big-endian integer of 8 bytes: 4 bytes",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-original-timestamp", b"1700000000000"),
            "header kafka_dlt-original-timestamp is not a big-endian integer of 8 bytes: 13 bytes",
        ),
        (
            replaced(DLT_HEADERS, "kafka_dlt-exception-message", b"\xff boom"),
            "header kafka_dlt-exception-message is not valid UTF-8: b'\\xff boom'",
        ),
        (
            tuple((n, v) for n, v in DLT_HEADERS if n != "kafka_dlt-original-topic"),
            "missing original topic (header kafka_dlt-original-topic)",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", b"\x00\x00\x00\x00\x04")),
            "header retry_topic-attempts is not a big-endian integer of 1 or 4 bytes: 5 bytes",
        ),
        # getAttempts reads 1 or 4 bytes only: 2 and 3 bytes are no size Spring writes or reads.
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", b"\x00\x04")),
            "header retry_topic-attempts is not a big-endian integer of 1 or 4 bytes: 2 bytes",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", b"\x00\x00\x04")),
            "header retry_topic-attempts is not a big-endian integer of 1 or 4 bytes: 3 bytes",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", b"")),
            "header retry_topic-attempts is not a big-endian integer of 1 or 4 bytes: 0 bytes",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", struct.pack(">i", -1))),
            "header retry_topic-attempts is negative: -1",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-attempts", struct.pack(">i", 5_000_000))),
            "header retry_topic-attempts is 5000000, above the limit 1000001",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-original-timestamp", b"")),
            "header retry_topic-original-timestamp is not a big-endian integer of 1 to 8 bytes: 0 bytes",
        ),
        (
            (("kafka_original-topic", b"orders"), ("retry_topic-original-timestamp", b"yesterday at noon")),
            "header retry_topic-original-timestamp is neither an epoch time nor ISO-8601",
        ),
        (
            (("retry_topic-attempts", struct.pack(">i", 2)),),
            "missing original topic (header kafka_original-topic)",
        ),
    ],
)
def test_given_bad_spring_headers_when_decoded_then_the_record_is_undecodable_with_a_precise_reason(headers, reason):
    result = undecodable(spring_record(headers))

    assert result.reason.startswith(reason)
    assert result.source_format in {SourceFormat.SPRING, SourceFormat.SPRING_RETRY}
