"""The seed system's JSON envelope, both of its writers, and how its JSON maps to bytes, numbers and times."""

from __future__ import annotations

import json

import pytest

from kafka_dlq.formats import SourceFormat, Undecodable, decode
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord

DLQ = DlqCoordinates(topic="orders.dlq", partition=1, offset=300)
WRITTEN_AT = 1700000500000


def envelope_record(envelope: object, *, headers=(("content-type", b"application/json"),)) -> KafkaRecord:
    value = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return KafkaRecord(
        topic=DLQ.topic, partition=DLQ.partition, offset=DLQ.offset, timestamp=WRITTEN_AT, value=value, headers=headers
    )


def decoded(envelope: object) -> DeadLetter:
    result = decode(envelope_record(envelope))
    assert isinstance(result, DeadLetter), result
    return result


def undecodable(envelope: object) -> Undecodable:
    result = decode(envelope_record(envelope))
    assert isinstance(result, Undecodable), result
    return result


def test_given_the_handlers_envelope_when_decoded_then_its_fields_are_read():
    dead_letter = decoded(
        {
            "original_topic": "orders",
            "original_value": '{"id": 7, "total": 12}',
            "error": "ValueError: total must be positive",
            "retry_count": 2,
            "first_failure_time": 1700000000.25,
            "partition": 3,
            "offset": 1234,
            "key": "order-7",
        }
    )

    assert dead_letter == DeadLetter(
        original=OriginalRecord(
            topic="orders",
            partition=3,
            offset=1234,
            key=b"order-7",
            value=b'{"id": 7, "total": 12}',
            headers=(("content-type", b"application/json"),),
        ),
        failure=Failure(error_class="ValueError", message="total must be positive"),
        attempts=3,  # the first failure and two failed retries
        first_failure=1700000000250,
        last_failure=WRITTEN_AT,
        source_format="seed-json",
        dlq=DLQ,
    )
    assert dead_letter.source_format is SourceFormat.SEED_JSON


def test_given_the_publishers_envelope_when_decoded_then_its_fields_are_read():
    dead_letter = decoded(
        {
            "original_topic": "orders",
            "original_value": {"id": 7, "note": "déjà vu", "items": [1, 2]},
            "error": "connection reset by peer",
            "attempt_count": 4,
            "original_partition": 0,
            "original_offset": 55,
            "original_timestamp": "2023-11-14T22:13:20.5Z",
            "original_key": None,
        }
    )

    assert dead_letter.original == OriginalRecord(
        topic="orders",
        partition=0,
        offset=55,
        timestamp=1700000000500,
        key=None,
        value='{"id":7,"note":"déjà vu","items":[1,2]}'.encode(),  # compact JSON, UTF-8, key order kept
        headers=(("content-type", b"application/json"),),
    )
    assert dead_letter.failure == Failure(message="connection reset by peer")
    assert dead_letter.attempts == 4
    # No first_failure_time: the age counts from the original record's time, as the publisher meant it.
    assert dead_letter.first_failure == 1700000000500
    assert dead_letter.last_failure == WRITTEN_AT


def test_given_neither_failure_time_nor_original_timestamp_then_the_envelopes_own_time_is_the_first_failure():
    dead_letter = decoded({"original_topic": "orders", "attempt_count": 2})

    assert dead_letter.first_failure == dead_letter.last_failure == WRITTEN_AT


def test_given_both_times_then_first_failure_time_wins_over_original_timestamp():
    dead_letter = decoded(
        {"original_topic": "orders", "first_failure_time": 1700000100, "original_timestamp": 1700000000}
    )

    assert dead_letter.first_failure == 1700000100000
    assert dead_letter.original.timestamp == 1700000000000


@pytest.mark.parametrize(
    ("original_value", "value"),
    [
        ("plain text ✓", "plain text ✓".encode()),
        ("", b""),
        (None, None),
        ([1, {"a": None}], b'[1,{"a":null}]'),
        (42, b"42"),
        (True, b"true"),
    ],
)
def test_given_an_original_value_when_decoded_then_strings_are_utf8_and_other_json_is_compact_json(
    original_value, value
):
    assert decoded({"original_topic": "orders", "original_value": original_value}).original.value == value


@pytest.mark.parametrize(
    ("written", "millis"),
    [
        (1700000000, 1700000000000),  # epoch seconds
        (1700000000.123, 1700000000123),  # epoch seconds with a fraction
        (1700000000123, 1700000000123),  # epoch milliseconds
        (1700000000123.0, 1700000000123),
        ("1700000000", 1700000000000),  # numbers as text
        ("2023-11-14T22:13:20Z", 1700000000000),  # ISO-8601
        ("2023-11-14T22:13:20.123+00:00", 1700000000123),
        ("2023-11-15T00:13:20+02:00", 1700000000000),
        ("2023-11-14T22:13:20", 1700000000000),  # no offset: UTC
        ("2023-11-14", 1699920000000),
        (0, 0),
    ],
)
def test_given_a_failure_time_in_any_common_form_when_decoded_then_it_is_epoch_milliseconds(written, millis):
    assert decoded({"original_topic": "orders", "first_failure_time": written}).first_failure == millis


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        ("KeyError: 'sku'", Failure(error_class="KeyError", message="'sku'")),
        (
            "app.errors.PaymentError: card declined",
            Failure(error_class="app.errors.PaymentError", message="card declined"),
        ),
        ("TimeoutError", Failure(error_class="TimeoutError", message=None)),
        ("Exception: something", Failure(error_class="Exception", message="something")),
        ("csv.Error: line 3", Failure(error_class="csv.Error", message="line 3")),
        (
            "Traceback (most recent call last):\nValueError: x",
            Failure(message="Traceback (most recent call last):\nValueError: x"),
        ),
        ("stock service said no", Failure(message="stock service said no")),
        ("note: retry later", Failure(message="note: retry later")),
        (
            {"type": "ValueError", "message": "bad", "traceback": "Traceback ..."},
            Failure(error_class="ValueError", message="bad", stacktrace="Traceback ..."),
        ),
        ({"code": 500}, Failure()),
        (None, Failure()),
        (["a", 1], Failure(message='["a",1]')),
    ],
)
def test_given_an_error_field_when_decoded_then_class_and_message_are_read(error, failure):
    assert decoded({"original_topic": "orders", "error": error}).failure == failure


def test_given_both_attempt_fields_when_decoded_then_attempt_count_wins_and_zero_still_means_one_failure():
    assert decoded({"original_topic": "o", "attempt_count": 6, "retry_count": 1}).attempts == 6
    assert decoded({"original_topic": "o", "attempt_count": 0}).attempts == 1
    assert decoded({"original_topic": "o", "retry_count": "2"}).attempts == 3
    assert decoded({"original_topic": "o"}).attempts == 1


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        ({"original_value": "x", "error": "boom"}, "missing original topic (field original_topic)"),
        ({"original_topic": None, "retry_count": 1}, "missing original topic (field original_topic)"),
        ({"original_topic": 7}, "field original_topic is not a non-empty string: 7"),
        ({"original_topic": ""}, "field original_topic is not a non-empty string: ''"),
        ({"original_topic": "o", "retry_count": -1}, "field retry_count is negative: -1"),
        ({"original_topic": "o", "retry_count": 2_000_000}, "field retry_count is 2000000, above the limit 999999"),
        (
            {"original_topic": "o", "attempt_count": 1_000_001},
            "field attempt_count is 1000001, above the limit 1000000",
        ),
        ({"original_topic": "o", "attempt_count": 2.5}, "field attempt_count is not an integer: 2.5"),
        ({"original_topic": "o", "attempt_count": True}, "field attempt_count is not an integer: True"),
        ({"original_topic": "o", "attempt_count": "three"}, "field attempt_count is not an integer: 'three'"),
        ({"original_topic": "o", "partition": -2}, "field partition is negative: -2"),
        ({"original_topic": "o", "original_offset": "12a"}, "field original_offset is not an integer: '12a'"),
        ({"original_topic": "o", "first_failure_time": "yesterday"}, "field first_failure_time is neither an epoch"),
        ({"original_topic": "o", "first_failure_time": -5}, "field first_failure_time is not a plausible epoch time"),
        ({"original_topic": "o", "first_failure_time": 10**20}, "field first_failure_time is not a plausible epoch"),
        (
            {"original_topic": "o", "original_timestamp": "1969-12-31T00:00:00Z"},
            "field original_timestamp is before 1970",
        ),
        ({"original_topic": "o", "original_timestamp": [2023]}, "field original_timestamp is not a time: [2023]"),
        (b'{"original_topic": "o", "original_value": "\\ud800"}', "field original_value holds text that is not valid"),
        (b'{"original_topic": "o", "first_failure_time": NaN}', "field first_failure_time is not a plausible epoch"),
    ],
)
def test_given_a_broken_envelope_when_decoded_then_it_is_undecodable_with_a_precise_reason(envelope, reason):
    result = undecodable(envelope)

    assert result.reason.startswith(reason)
    assert result.source_format is SourceFormat.SEED_JSON
    assert result.dlq == DLQ


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"order 7 failed", "unknown format: no dead-letter headers, and the value is not JSON (Expecting value"),
        (b'{"original_topic": "o"', "unknown format: no dead-letter headers, and the value is not JSON"),
        (b'{"original_topic": "caf\xe9"}', "unknown format: no dead-letter headers, and the value is not JSON"),
        (b"", "unknown format: no dead-letter headers, and the value is empty"),
        (b"[1, 2]", "unknown format: no dead-letter headers, and the value is JSON but not an object (list)"),
        (b'{"id": 7, "error": "x"}', "unknown format: no dead-letter headers, and the value is a JSON object without"),
        (b"[" * 100_000, "unknown format: no dead-letter headers, and the value is not JSON"),
    ],
)
def test_given_a_value_that_is_no_envelope_and_no_known_headers_when_decoded_then_the_format_is_unknown(value, reason):
    result = undecodable(value)

    assert result.reason.startswith(reason)
    assert result.source_format is None


def test_given_a_null_value_and_no_headers_when_decoded_then_the_format_is_unknown():
    result = decode(KafkaRecord(topic=DLQ.topic, partition=DLQ.partition, offset=DLQ.offset))

    assert isinstance(result, Undecodable)
    assert result.reason == "unknown format: no dead-letter headers, and the value is empty"
