"""The native format: kafka-dlq's own dead letters, as DESIGN.md ("Records and formats") specifies them."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from kafka_dlq.formats import (
    MAX_MESSAGE_BYTES,
    MAX_STACKTRACE_BYTES,
    SourceFormat,
    Undecodable,
    decode,
    encode_native,
)
from kafka_dlq.kafka.record import Headers, KafkaRecord
from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord

DLQ = DlqCoordinates(topic="orders.dlq", partition=2, offset=70)

FULL_HEADERS: Headers = (
    ("dlq.original.topic", b"orders"),
    ("dlq.original.partition", b"3"),
    ("dlq.original.offset", b"1234"),
    ("dlq.original.timestamp", b"1700000000000"),
    ("dlq.original.group", b"billing"),
    ("dlq.error.class", b"builtins.ValueError"),
    ("dlq.error.message", "prix invalide: 12 €".encode()),
    ("dlq.error.stacktrace", b'Traceback (most recent call last):\n  File "app.py"\nValueError'),
    ("dlq.attempts", b"4"),
    ("dlq.first.failure", b"1700000001000"),
    ("dlq.last.failure", b"1700000009000"),
    ("dlq.reason", b"max_attempts"),
    ("dlq.redrive.count", b"1"),
)


def dead_letter_record(
    headers: Headers, *, key: bytes | None = b"order-1", timestamp: int | None = None
) -> KafkaRecord:
    return KafkaRecord(
        topic=DLQ.topic,
        partition=DLQ.partition,
        offset=DLQ.offset,
        timestamp=timestamp,
        key=key,
        value=b"{}",
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


def with_header(name: str, value: bytes | None) -> Headers:
    return tuple((n, value if n == name else v) for n, v in FULL_HEADERS)


def test_given_every_native_header_when_decoded_then_every_field_is_read_and_only_original_headers_remain():
    record = dead_letter_record((("traceparent", b"00-abc-01"), *FULL_HEADERS, ("added-later", None)))

    dead_letter = decoded(record)

    assert dead_letter == DeadLetter(
        original=OriginalRecord(
            topic="orders",
            partition=3,
            offset=1234,
            timestamp=1700000000000,
            key=b"order-1",
            value=b"{}",
            headers=(("traceparent", b"00-abc-01"), ("added-later", None)),
        ),
        failure=Failure(
            error_class="builtins.ValueError",
            message="prix invalide: 12 €",
            stacktrace='Traceback (most recent call last):\n  File "app.py"\nValueError',
        ),
        attempts=4,
        first_failure=1700000001000,
        last_failure=1700000009000,
        group="billing",
        reason=Reason.MAX_ATTEMPTS,
        redrive_count=1,
        source_format="native",
        dlq=DLQ,
    )
    assert dead_letter.source_format is SourceFormat.NATIVE


def test_given_only_the_topic_when_decoded_then_defaults_fill_in_and_failure_times_are_the_records_timestamp():
    dead_letter = decoded(dead_letter_record((("dlq.original.topic", b"orders"),), timestamp=1700000005000))

    assert dead_letter.original.partition is None
    assert dead_letter.attempts == 1  # it is in a dead-letter topic: it failed at least once
    assert dead_letter.redrive_count == 0
    assert dead_letter.reason is None
    assert dead_letter.first_failure == dead_letter.last_failure == 1700000005000


def test_given_a_repeated_header_when_decoded_then_the_last_value_wins_as_in_kafka():
    dead_letter = decoded(dead_letter_record((*FULL_HEADERS, ("dlq.attempts", b"5"))))

    assert dead_letter.attempts == 5


def test_given_a_key_that_is_not_utf8_when_decoded_then_it_is_kept_byte_for_byte():
    dead_letter = decoded(dead_letter_record(FULL_HEADERS, key=b"\xff\xfe\x00binary"))

    assert dead_letter.original.key == b"\xff\xfe\x00binary"


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("dlq.original.partition", b"x", "header dlq.original.partition is not a decimal integer: b'x'"),
        ("dlq.original.partition", b"-1", "header dlq.original.partition is negative: -1"),
        ("dlq.original.partition", b"2147483648", "header dlq.original.partition is 2147483648, above the limit"),
        ("dlq.original.offset", b" 12", "header dlq.original.offset is not a decimal integer: b' 12'"),
        ("dlq.attempts", b"-3", "header dlq.attempts is negative: -3"),
        ("dlq.attempts", b"1000001", "header dlq.attempts is 1000001, above the limit 1000000"),
        ("dlq.attempts", b"+3", "header dlq.attempts is not a decimal integer: b'+3'"),
        ("dlq.attempts", "\uff13".encode(), "header dlq.attempts is not a decimal integer"),  # a full-width 3
        ("dlq.attempts", b"9" * 40, "header dlq.attempts is out of range"),
        ("dlq.redrive.count", b"5000000", "header dlq.redrive.count is 5000000, above the limit 1000000"),
        ("dlq.first.failure", b"1.5e12", "header dlq.first.failure is not a decimal integer"),
        ("dlq.reason", b"tired", "header dlq.reason is not one of max_attempts, max_age, non_retryable"),
        ("dlq.error.message", b"caf\xe9", "header dlq.error.message is not valid UTF-8: b'caf\\xe9'"),
        ("dlq.original.group", b"\xc3", "header dlq.original.group is not valid UTF-8"),
        ("dlq.original.topic", b"\x80orders", "header dlq.original.topic is not valid UTF-8"),
        ("dlq.original.topic", b"", "header dlq.original.topic is empty: no original topic"),
        ("dlq.original.topic", None, "header dlq.original.topic is null: no original topic"),
    ],
)
def test_given_a_bad_native_header_when_decoded_then_it_is_undecodable_with_a_precise_reason(name, value, reason):
    result = undecodable(dead_letter_record(with_header(name, value)))

    assert result.reason.startswith(reason)
    assert result.source_format is SourceFormat.NATIVE
    assert result.dlq == DLQ


def test_given_native_headers_without_the_original_topic_when_decoded_then_the_topic_is_reported_missing():
    headers = tuple((name, value) for name, value in FULL_HEADERS if name != "dlq.original.topic")

    result = undecodable(dead_letter_record(headers))

    assert result.reason == "missing original topic (header dlq.original.topic)"
    assert result.source_format is SourceFormat.NATIVE


def test_given_only_a_redrive_count_when_decoded_then_it_is_no_native_dead_letter():
    # Redrive sends the original record back with dlq.redrive.count as its loop guard; that alone is not a failure.
    result = undecodable(dead_letter_record((("dlq.redrive.count", b"2"),)))

    assert result.source_format is None
    assert result.reason.startswith("unknown format")


def a_dead_letter(**changes: object) -> DeadLetter:
    dead_letter = DeadLetter(
        original=OriginalRecord(
            topic="orders",
            partition=3,
            offset=1234,
            timestamp=1700000000000,
            key=b"\x00order-1",
            value=b'{"total": 12}',
            headers=(("traceparent", b"00-abc-01"), ("empty", None), ("traceparent", b"again")),
        ),
        failure=Failure(error_class="builtins.ValueError", message="bad total", stacktrace="Traceback ...\nValueError"),
        attempts=3,
        first_failure=1700000001000,
        last_failure=1700000003000,
        group="billing",
        reason=Reason.REPEAT_OFFENDER,
        redrive_count=2,
    )
    return dataclasses.replace(dead_letter, **changes)


def read_back(dead_letter: DeadLetter, *, spring_compatible: bool = False) -> DeadLetter | Undecodable:
    encoded = encode_native(dead_letter, spring_compatible=spring_compatible)
    return decode(
        KafkaRecord(
            topic=DLQ.topic,
            partition=DLQ.partition,
            offset=DLQ.offset,
            timestamp=1700000099000,
            key=encoded.key,
            value=encoded.value,
            headers=encoded.headers,
        )
    )


@pytest.mark.parametrize("spring_compatible", [False, True])
def test_given_a_dead_letter_when_encoded_and_decoded_then_it_is_the_same_dead_letter(spring_compatible):
    dead_letter = a_dead_letter()

    assert read_back(dead_letter, spring_compatible=spring_compatible) == dataclasses.replace(dead_letter, dlq=DLQ)


def test_given_a_dead_letter_with_little_known_when_round_tripped_then_nothing_is_invented():
    dead_letter = DeadLetter(original=OriginalRecord(topic="orders"), attempts=0, first_failure=5, last_failure=6)

    assert read_back(dead_letter) == dataclasses.replace(dead_letter, dlq=DLQ)


def test_given_a_dead_letter_when_encoded_then_original_headers_come_first_and_native_headers_follow():
    encoded = encode_native(a_dead_letter())

    assert encoded.key == b"\x00order-1"
    assert encoded.value == b'{"total": 12}'
    assert encoded.headers == (
        ("traceparent", b"00-abc-01"),
        ("empty", None),
        ("traceparent", b"again"),
        ("dlq.original.topic", b"orders"),
        ("dlq.original.partition", b"3"),
        ("dlq.original.offset", b"1234"),
        ("dlq.original.timestamp", b"1700000000000"),
        ("dlq.original.group", b"billing"),
        ("dlq.error.class", b"builtins.ValueError"),
        ("dlq.error.message", b"bad total"),
        ("dlq.error.stacktrace", b"Traceback ...\nValueError"),
        ("dlq.attempts", b"3"),
        ("dlq.first.failure", b"1700000001000"),
        ("dlq.last.failure", b"1700000003000"),
        ("dlq.reason", b"repeat_offender"),
        ("dlq.redrive.count", b"2"),
    )


def test_given_stale_native_headers_among_the_original_ones_when_encoded_then_only_the_fresh_ones_are_written():
    # A record that failed, was redriven with its dlq.* headers, and failed again in a Spring consumer.
    stale = (("dlq.error.class", b"builtins.OldError"), ("dlq.reason", b"manual"), ("tenant", b"acme"))
    dead_letter = a_dead_letter(original=OriginalRecord(topic="orders", headers=stale), reason=None)

    headers = encode_native(dead_letter).headers

    assert headers[0] == ("tenant", b"acme")
    assert "dlq.reason" not in dict(headers)
    assert dict(headers)["dlq.error.class"] == b"builtins.ValueError"


def test_given_a_dead_letter_not_parked_when_encoded_then_there_is_no_reason_header():
    encoded = encode_native(a_dead_letter(reason=None))

    assert "dlq.reason" not in dict(encoded.headers)


@pytest.mark.parametrize("filler", ["a", "é", "€", "😀"])
def test_given_a_long_message_when_encoded_then_it_is_capped_at_4_kib_without_splitting_a_character(filler):
    text = "x" + filler * 20_000  # "x" shifts every multi-byte character across the cap boundary

    encoded = encode_native(a_dead_letter(failure=Failure(message=text)))

    written = dict(encoded.headers)["dlq.error.message"]
    assert MAX_MESSAGE_BYTES == 4096
    assert MAX_MESSAGE_BYTES - len(filler.encode()) < len(written) <= MAX_MESSAGE_BYTES
    assert text.startswith(written.decode("utf-8"))  # valid UTF-8, and a prefix of the message


@pytest.mark.parametrize("filler", ["a", "é", "😀"])
def test_given_a_long_stacktrace_when_encoded_then_it_is_capped_at_16_kib(filler):
    text = "x" + filler * 50_000

    encoded = encode_native(a_dead_letter(failure=Failure(stacktrace=text)))

    written = dict(encoded.headers)["dlq.error.stacktrace"]
    assert MAX_STACKTRACE_BYTES == 16384
    assert MAX_STACKTRACE_BYTES - len(filler.encode()) < len(written) <= MAX_STACKTRACE_BYTES
    assert text.startswith(written.decode("utf-8"))


def test_given_a_message_with_a_lone_surrogate_when_encoded_then_it_is_written_visibly_and_reads_back():
    encoded = encode_native(a_dead_letter(failure=Failure(message="bad path /tmp/\udcff")))

    assert dict(encoded.headers)["dlq.error.message"] == b"bad path /tmp/\\udcff"


def test_given_spring_compatible_when_encoded_then_the_kafka_dlt_headers_are_spring_encodings():
    # Encodings of spring-projects/spring-kafka
    # spring-kafka/src/main/java/org/springframework/kafka/listener/DeadLetterPublishingRecoverer.java
    # (maybeAddOriginalHeaders: putInt for the partition, putLong for offset and timestamp, UTF-8 text otherwise).
    headers = encode_native(a_dead_letter(), spring_compatible=True).headers

    spring = {name: value for name, value in headers if name.startswith("kafka_dlt-")}
    assert spring == {
        "kafka_dlt-original-topic": b"orders",
        "kafka_dlt-original-partition": struct.pack(">i", 3),
        "kafka_dlt-original-offset": struct.pack(">q", 1234),
        "kafka_dlt-original-timestamp": struct.pack(">q", 1700000000000),
        # record.timestampType().toString(): the recoverer always writes it.
        "kafka_dlt-original-timestamp-type": b"CreateTime",
        "kafka_dlt-original-consumer-group": b"billing",
        "kafka_dlt-exception-fqcn": b"builtins.ValueError",
        "kafka_dlt-exception-cause-fqcn": b"builtins.ValueError",
        "kafka_dlt-exception-message": b"bad total",
        "kafka_dlt-exception-stacktrace": b"Traceback ...\nValueError",
    }


@pytest.mark.parametrize(
    ("timestamp", "extra", "written"),
    [
        (1700000000000, {}, b"CreateTime"),
        (None, {}, b"NoTimestampType"),
        (1700000000000, {"timestamp_type": "LogAppendTime"}, b"LogAppendTime"),  # as Spring told us
        (1700000000000, {"timestamp_type": "Yesterday"}, b"CreateTime"),  # not a TimestampType name
    ],
)
def test_given_spring_compatible_when_encoded_then_the_timestamp_type_is_a_kafka_timestamp_type_name(
    timestamp, extra, written
):
    dead_letter = a_dead_letter(original=OriginalRecord(topic="orders", timestamp=timestamp), extra=extra)

    headers = encode_native(dead_letter, spring_compatible=True).headers

    assert dict(headers)["kafka_dlt-original-timestamp-type"] == written
    assert [name for name, _ in headers].count("kafka_dlt-original-timestamp-type") == 1


def test_given_a_spring_compatible_dead_letter_when_only_its_kafka_dlt_headers_are_read_then_they_tell_the_same_story():
    dead_letter = a_dead_letter()
    encoded = encode_native(dead_letter, spring_compatible=True)
    spring_only = tuple((name, value) for name, value in encoded.headers if not name.startswith("dlq."))

    as_spring = decoded(dead_letter_record(spring_only, key=encoded.key))

    assert as_spring.source_format is SourceFormat.SPRING
    assert as_spring.original == dataclasses.replace(dead_letter.original, value=b"{}")
    assert as_spring.failure == dead_letter.failure
    assert as_spring.group == dead_letter.group


def test_given_kafka_dlt_headers_from_an_earlier_spring_failure_when_round_tripped_then_they_stay_original_headers():
    # A Spring dead letter redriven by us failed again in Python: Spring's headers are part of the original record.
    earlier = (("kafka_dlt-original-topic", b"payments"), ("kafka_dlt-exception-fqcn", b"java.lang.Error"))
    dead_letter = a_dead_letter(original=OriginalRecord(topic="orders", headers=earlier))

    assert read_back(dead_letter, spring_compatible=True) == dataclasses.replace(dead_letter, dlq=DLQ)
