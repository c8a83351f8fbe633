"""Format detection, and the promise that decoding never raises: whatever the bytes, a DeadLetter or Undecodable."""

from __future__ import annotations

import dataclasses
import json
import struct
from datetime import timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kafka_dlq.formats
from kafka_dlq.formats import MAX_ATTEMPTS, SourceFormat, Undecodable, decode, encode_native, native, spring
from kafka_dlq.formats.seed import ENVELOPE_FIELDS
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.redrive import Outgoing, redrive_record

DLQ = DlqCoordinates(topic="mixed.dlq", partition=0, offset=5)


def record(
    *headers: tuple[str, bytes | None], value: bytes | None = b"payload", key: bytes | None = None
) -> KafkaRecord:
    return KafkaRecord(
        topic=DLQ.topic, partition=DLQ.partition, offset=DLQ.offset, key=key, value=value, headers=headers
    )


NATIVE = ("dlq.original.topic", b"from-native")
SPRING = ("kafka_dlt-original-topic", b"from-spring")
SPRING_RETRY = ("kafka_original-topic", b"from-retry")
CONNECT = ("__connect.errors.topic", b"from-connect")
STREAMS = ("__streams.errors.topic", b"from-streams")
SHARE = ("__dlq.errors.topic", b"from-share")
ENVELOPE = json.dumps({"original_topic": "from-seed"}).encode()


@pytest.mark.parametrize(
    ("headers", "source_format", "topic"),
    [
        ((SPRING, CONNECT, NATIVE), SourceFormat.NATIVE, "from-native"),
        ((CONNECT, SPRING_RETRY, SPRING), SourceFormat.SPRING, "from-spring"),
        ((SHARE, STREAMS, CONNECT, SPRING_RETRY), SourceFormat.SPRING_RETRY, "from-retry"),
        ((SHARE, STREAMS, CONNECT), SourceFormat.CONNECT, "from-connect"),
        ((SHARE, STREAMS), SourceFormat.STREAMS, "from-streams"),
        ((SHARE,), SourceFormat.SHARE_GROUP, "from-share"),
        ((), SourceFormat.SEED_JSON, "from-seed"),
    ],
)
def test_given_headers_of_several_formats_when_decoded_then_the_documented_order_decides(headers, source_format, topic):
    dead_letter = decode(record(*headers, value=ENVELOPE))

    assert isinstance(dead_letter, DeadLetter)
    assert (dead_letter.source_format, dead_letter.original.topic) == (source_format, topic)


def test_given_another_formats_headers_when_decoded_then_they_stay_with_the_original_headers():
    dead_letter = decode(record(CONNECT, SPRING))

    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.original.headers == (CONNECT,)


def test_given_a_redriven_record_that_failed_in_spring_when_decoded_then_its_redrive_count_is_kept():
    # Redrive sent the record back with dlq.redrive.count; Spring kept it among the original headers.
    dead_letter = decode(record(("dlq.redrive.count", b"2"), ("traceparent", b"t"), SPRING))

    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.redrive_count == 2
    assert dead_letter.original.headers == (("traceparent", b"t"),)


def test_given_a_corrupt_redrive_count_on_a_spring_record_when_decoded_then_it_is_undecodable():
    result = decode(record(("dlq.redrive.count", b"many"), SPRING))

    assert isinstance(result, Undecodable)
    assert result.reason == "header dlq.redrive.count is not a decimal integer: b'many'"
    assert result.source_format is SourceFormat.SPRING


@pytest.mark.parametrize(
    "time",
    ["9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59.5-00:01", "9999-12-31T23:00:00-01:00"],
)
def test_given_an_iso_time_after_9999_through_its_offset_when_decoded_then_it_is_undecodable(time):
    # ISO text goes through the same upper bound as epoch numbers: a time the native format cannot carry would
    # decode here and then fail when the dead letter is written back.
    retry_topic = record(("kafka_original-topic", b"orders"), ("retry_topic-original-timestamp", time.encode()))
    envelope = record(value=json.dumps({"original_topic": "orders", "first_failure_time": time}).encode())

    for result in (decode(retry_topic), decode(envelope)):
        assert isinstance(result, Undecodable), result
        assert "not a plausible time (after 9999-12-31Z)" in result.reason


def test_given_the_last_iso_time_native_headers_carry_when_decoded_then_it_round_trips():
    dead_letter = decode(
        record(
            value=json.dumps({"original_topic": "orders", "first_failure_time": "9999-12-31T23:59:59.999Z"}).encode()
        )
    )

    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.first_failure == 253_402_300_799_999
    again = decode(record(*encode_native(dead_letter).headers, value=dead_letter.original.value))
    assert isinstance(again, DeadLetter) and again.first_failure == dead_letter.first_failure


def test_given_unknown_headers_and_a_binary_value_when_decoded_then_the_format_is_unknown():
    result = decode(record(("x-custom", b"1"), value=b"\x00\x01\x02"))

    assert isinstance(result, Undecodable)
    assert result.reason.startswith("unknown format: no dead-letter headers, and the value is not JSON")
    assert result.source_format is None
    assert result.dlq == DLQ


def test_given_a_decoder_with_a_bug_when_decoding_then_the_record_is_undecodable_and_nothing_is_raised(monkeypatch):
    def broken(_: KafkaRecord) -> DeadLetter:
        raise KeyError("oops")

    monkeypatch.setattr(native, "decode_native", broken)

    result = decode(record(NATIVE))

    assert isinstance(result, Undecodable)
    assert result.reason == f"{kafka_dlq.formats.INTERNAL_ERROR}: KeyError: 'oops'"


# Property: random header sets (known names, names under the known prefixes, anything), random values.

KNOWN_NAMES = sorted(
    native.HEADERS
    | set(dataclasses.astuple(spring.DLT))
    | spring.RETRY_HEADERS
    | {f"__connect.errors.{name}" for name in ("topic", "partition", "offset", "connector.name", "task.id", "stage")}
    | {f"__connect.errors.{name}" for name in ("class.name", "exception.class.name", "exception.message")}
    | {f"__streams.errors.{name}" for name in ("exception", "message", "stacktrace", "topic", "partition", "offset")}
    | {f"__dlq.errors.{name}" for name in ("topic", "partition", "offset", "group", "delivery.count", "message")}
)
PREFIXES = ["dlq.", "kafka_dlt-", "kafka_", "retry_topic-", "__connect.errors.", "__streams.errors.", "__dlq.errors."]

names = st.one_of(
    st.sampled_from(KNOWN_NAMES),
    st.builds(str.__add__, st.sampled_from(PREFIXES), st.text(max_size=12)),
    st.text(max_size=12),
)
longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# ISO-8601 times anywhere in datetime's range, with any offset Python allows (up to 23:59 either way): at the ends
# of the range an offset moves the moment past 9999-12-31Z or before 1970, which no epoch header can carry.
EXTREME_ISO_TIMES = [
    "9999-12-31T23:59:59-23:59",
    "9999-12-31T23:59:59.999+00:00",
    "9999-12-31T23:59:59.999999+00:00",
    "9999-12-31T00:00:01-00:01",
    "1970-01-01T00:00:00+00:01",
    "1970-01-01T00:00:00-23:59",
    "0001-01-01T00:00:00+23:59",
]
iso_times = st.one_of(
    st.sampled_from(EXTREME_ISO_TIMES),
    st.builds(
        lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
        st.datetimes(),
        st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1),
    ),
)
header_values = st.one_of(
    iso_times.map(str.encode),
    st.none(),
    st.binary(max_size=24),
    longs.map(lambda n: str(n).encode()),
    st.integers(min_value=-(2**31), max_value=2**31 - 1).map(lambda n: struct.pack(">i", n)),
    longs.map(lambda n: struct.pack(">q", n)),
    st.text(max_size=24).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"-1", b"0", b"1000001", b"max_attempts", b"2023-11-14T22:13:20Z", b"\xff"]),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16) | iso_times,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
envelopes = st.dictionaries(
    st.sampled_from(sorted(ENVELOPE_FIELDS | {"error", "partition", "offset", "key"})), json_values, max_size=8
)
values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    envelopes.map(lambda envelope: json.dumps(envelope).encode()),
    envelopes.map(lambda envelope: json.dumps({**envelope, "original_topic": "orders"}).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
)
random_headers = st.lists(st.tuples(names, header_values), max_size=8)
# Most random header sets lack a usable original topic; these have one, so decoding goes past it.
TOPIC_HEADERS = [
    "dlq.original.topic",
    "kafka_dlt-original-topic",
    "kafka_original-topic",
    "__connect.errors.topic",
    "__streams.errors.topic",
    "__dlq.errors.topic",
]
with_a_topic = st.builds(
    lambda name, others, first: ((name, b"orders"), *others) if first else (*others, (name, b"orders")),
    st.sampled_from(TOPIC_HEADERS),
    st.lists(st.tuples(st.sampled_from(KNOWN_NAMES) | names, header_values), max_size=8),
    st.booleans(),
)
records = st.builds(
    KafkaRecord,
    topic=st.just(DLQ.topic),
    partition=st.just(DLQ.partition),
    offset=st.just(DLQ.offset),
    timestamp=st.none() | st.integers(min_value=0, max_value=2**41),
    key=st.none() | st.binary(max_size=16),
    value=values,
    headers=random_headers.map(tuple) | with_a_topic,
)


def has_surrogate(text: str | None) -> bool:
    return text is not None and any("\ud800" <= char <= "\udfff" for char in text)


def as_read_from_the_dlq(kafka_record: KafkaRecord, dead_letter: DeadLetter) -> KafkaRecord:
    encoded = encode_native(dead_letter)
    return dataclasses.replace(kafka_record, key=encoded.key, value=encoded.value, headers=encoded.headers)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_given_any_headers_and_value_when_decoded_then_the_result_is_a_dead_letter_or_undecodable(kafka_record):
    result = decode(kafka_record)

    assert isinstance(result, DeadLetter | Undecodable)
    assert result.dlq == DLQ
    if isinstance(result, Undecodable):
        assert result.reason
        assert not result.reason.startswith(kafka_dlq.formats.INTERNAL_ERROR)
        return
    assert result.original.topic
    assert 0 <= result.attempts <= MAX_ATTEMPTS
    # And whatever it was read from, kafka-dlq can write it natively and read it back.
    failure = result.failure
    if not any(map(has_surrogate, (failure.error_class, failure.message, failure.stacktrace))):
        # (a seed envelope may escape lone surrogates into its error text: those are written visibly, not back)
        stale = native.HEADERS  # native metadata among the original headers is shadowed by the fresh headers
        expected = dataclasses.replace(
            result,
            original=dataclasses.replace(
                result.original, headers=tuple(h for h in result.original.headers if h[0] not in stale)
            ),
            source_format=SourceFormat.NATIVE,
            extra={},  # format-specific facts have no native header
        )
        assert decode(as_read_from_the_dlq(kafka_record, result)) == expected


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
dead_letters = st.builds(
    DeadLetter,
    original=st.builds(
        OriginalRecord,
        topic=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
        partition=st.none() | st.integers(min_value=0, max_value=2**31 - 1),
        offset=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
        timestamp=st.none() | st.integers(min_value=0, max_value=253_402_300_799_999),
        key=st.none() | st.binary(max_size=16),
        value=st.none() | st.binary(max_size=32),
        headers=st.lists(
            st.tuples(
                st.text(max_size=10).filter(lambda name: name not in native.HEADERS), st.none() | st.binary(max_size=8)
            ),
            max_size=4,
        ).map(tuple),
    ),
    failure=st.builds(Failure, error_class=st.none() | texts, message=st.none() | texts, stacktrace=st.none() | texts),
    attempts=st.integers(min_value=0, max_value=MAX_ATTEMPTS),
    first_failure=st.integers(min_value=0, max_value=2**45),
    last_failure=st.integers(min_value=0, max_value=2**45),
    group=st.none() | texts,
    reason=st.none() | st.sampled_from(Reason),
    redrive_count=st.integers(min_value=0, max_value=MAX_ATTEMPTS),
)


@settings(max_examples=300, deadline=None)
@given(dead_letters, st.booleans())
def test_given_any_dead_letter_when_encoded_natively_and_decoded_then_it_is_the_same(dead_letter, spring_compatible):
    encoded = encode_native(dead_letter, spring_compatible=spring_compatible)

    result = decode(record(*encoded.headers, value=encoded.value, key=encoded.key))

    assert result == dataclasses.replace(dead_letter, dlq=DLQ)


def redriven_home() -> tuple[tuple[str, bytes | None], ...]:
    """The headers a redrive sends home with a record: its own, then its failure history and the loop guard."""
    original = OriginalRecord(topic="orders", key=b"k", value=b"v", headers=(("traceparent", b"t"),))
    out = redrive_record(DeadLetter(original=original, attempts=3, first_failure=1_700_000_000_000))
    assert isinstance(out, Outgoing)
    return tuple(out.headers)


def test_given_a_redriven_record_that_failed_again_in_the_seed_system_when_decoded_then_it_is_a_seed_dead_letter():
    # The seed publisher keeps the record's headers on its JSON envelope: redrive's dlq.* headers come along.
    envelope = json.dumps({"original_topic": "orders", "original_value": "v", "attempt_count": 2}).encode()

    dead_letter = decode(record(*redriven_home(), value=envelope))

    assert isinstance(dead_letter, DeadLetter)
    assert (dead_letter.source_format, dead_letter.original.topic) == (SourceFormat.SEED_JSON, "orders")
    assert dead_letter.redrive_count == 1


def test_given_a_redriven_record_forwarded_as_is_when_decoded_then_it_is_no_broken_native_dead_letter():
    # A plain forwarder put the redriven record on the DLQ unchanged: no format at all, not "missing topic".
    result = decode(record(*redriven_home(), value=b"v"))

    assert isinstance(result, Undecodable)
    assert result.source_format is None
    assert "missing original topic" not in result.reason


LATER = 1_700_000_900_000
"""When the redriven record failed again: after the first failure its history carries (1_700_000_000_000)."""


def failed_again(*format_headers: tuple[str, bytes | None]) -> KafkaRecord:
    """A redriven record (3 attempts, first failure at 1_700_000_000_000) dead-lettered again by another system,
    which kept the headers it came with and added its own."""
    return dataclasses.replace(record(*redriven_home(), *format_headers), timestamp=LATER)


def test_given_a_redriven_record_that_failed_again_in_spring_when_decoded_then_its_history_goes_on():
    again = DeadLetter(
        original=OriginalRecord(topic="orders", partition=0, offset=9, timestamp=LATER),
        failure=Failure(error_class="java.lang.IllegalStateException"),
    )

    dead_letter = decode(failed_again(*spring.spring_headers(again)))

    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.source_format is SourceFormat.SPRING
    assert (dead_letter.attempts, dead_letter.first_failure, dead_letter.last_failure) == (4, 1_700_000_000_000, LATER)
    assert dead_letter.redrive_count == 1
    assert dead_letter.original.headers == (("traceparent", b"t"),)


def test_given_a_redriven_record_that_failed_again_in_connect_when_decoded_then_its_history_goes_on():
    connect_headers = (
        ("__connect.errors.topic", b"orders"),
        ("__connect.errors.partition", b"0"),
        ("__connect.errors.offset", b"9"),
        ("__connect.errors.exception.class.name", b"org.apache.kafka.connect.errors.DataException"),
    )

    dead_letter = decode(failed_again(*connect_headers))

    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.source_format is SourceFormat.CONNECT
    assert (dead_letter.attempts, dead_letter.first_failure) == (4, 1_700_000_000_000)
    assert dead_letter.original.headers == (("traceparent", b"t"),)


def test_given_a_carried_history_when_another_system_failed_earlier_or_often_then_the_earlier_and_the_cap_win():
    early = dataclasses.replace(record(("dlq.first.failure", b"%d" % LATER), SPRING), timestamp=1_000)
    many = record(("dlq.attempts", b"%d" % MAX_ATTEMPTS), ("retry_topic-attempts", struct.pack(">i", 5)), SPRING_RETRY)

    assert decode(early).first_failure == 1_000
    assert decode(many).attempts == MAX_ATTEMPTS


def test_given_a_corrupt_carried_attempt_count_on_a_connect_record_when_decoded_then_it_is_undecodable():
    result = decode(record(("dlq.attempts", b"three"), CONNECT))

    assert isinstance(result, Undecodable)
    assert result.reason == "header dlq.attempts is not a decimal integer: b'three'"
