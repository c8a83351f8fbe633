"""The record filter of peek, redrive and park: pure, every criterion ANDed, a criterion's values ORed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kafka_dlq.errors import ConfigError
from kafka_dlq.filters import RecordFilter, check_resumable, is_relative, parse_header, parse_offsets, parse_time
from kafka_dlq.formats import decode, encode_native
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

T0 = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def dead_letter_record(
    *,
    partition: int = 0,
    offset: int = 10,
    timestamp: int | None = T0,
    topic: str = "orders",
    key: bytes | None = b"order-1",
    error_class: str = "builtins.TimeoutError",
    message: str = "read timed out after 30 s",
    headers: tuple[tuple[str, bytes | None], ...] = (("tenant", b"acme"),),
) -> KafkaRecord:
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(topic=topic, key=key, value=b"{}", headers=headers),
            failure=Failure(error_class=error_class, message=message),
            attempts=1,
        )
    )
    return KafkaRecord(
        topic="orders.dlq",
        partition=partition,
        offset=offset,
        timestamp=timestamp,
        key=encoded.key,
        value=encoded.value,
        headers=encoded.headers,
    )


def selects(spec: RecordFilter, record: KafkaRecord) -> bool:
    return spec.matches(record, decode(record))


def test_an_empty_filter_selects_every_record_even_an_undecodable_one():
    junk = KafkaRecord(topic="orders.dlq", partition=0, offset=0, value=b"\xff not a dead letter")
    assert RecordFilter().is_empty
    assert selects(RecordFilter(), dead_letter_record())
    assert selects(RecordFilter(), junk)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (RecordFilter(since=T0), True),
        (RecordFilter(since=T0 + 1), False),
        (RecordFilter(until=T0 + 1), True),
        (RecordFilter(until=T0), False),  # until is exclusive
        (RecordFilter(since=T0 - 5, until=T0 + 5), True),
        (RecordFilter(partitions=frozenset({0, 2})), True),
        (RecordFilter(partitions=frozenset({1})), False),
        (RecordFilter(first_offset=10, last_offset=10), True),  # offsets are inclusive at both ends
        (RecordFilter(first_offset=11), False),
        (RecordFilter(last_offset=9), False),
        (RecordFilter(original_topics=("payments", "orders")), True),
        (RecordFilter(original_topics=("payments",)), False),
        (RecordFilter(error_classes=("builtins.TimeoutError",)), True),
        (RecordFilter(error_classes=("TimeoutError",)), True),
        (RecordFilter(error_classes=("asyncio.TimeoutError",)), False),  # a dotted name must match whole
        (RecordFilter(error_classes=("Timeout",)), False),  # a class name, not a substring
        (RecordFilter(error_pattern=r"timed\s+OUT"), True),  # any case
        (RecordFilter(error_pattern=r"^builtins\.Timeout"), True),  # the class is searched too
        (RecordFilter(error_pattern="connection refused"), False),
        (RecordFilter(keys=(b"order-2", b"order-1")), True),
        (RecordFilter(keys=(b"order",)), False),
        (RecordFilter(headers=(("tenant", b"acme"),)), True),
        (RecordFilter(headers=(("tenant", None),)), True),
        (RecordFilter(headers=(("dlq.original.topic", b"orders"),)), True),  # the DLQ record's own headers
        (RecordFilter(headers=(("tenant", b"acme"), ("region", None))), False),  # every header must match
        (RecordFilter(headers=(("tenant", b"globex"),)), False),
    ],
)
def test_each_criterion_selects_what_it_names(spec, expected):
    assert selects(spec, dead_letter_record()) is expected


def test_criteria_together_must_all_hold():
    spec = RecordFilter(original_topics=("orders",), error_classes=("KeyError",))
    assert not selects(spec, dead_letter_record())
    assert selects(spec, dead_letter_record(error_class="builtins.KeyError"))


def test_a_time_range_never_selects_a_record_without_a_timestamp():
    assert not selects(RecordFilter(since=0), dead_letter_record(timestamp=None))


def test_criteria_on_the_failure_never_select_an_undecodable_record():
    junk = KafkaRecord(topic="orders.dlq", partition=0, offset=3, key=b"order-1", value=b"not json")
    for spec in (
        RecordFilter(original_topics=("orders",)),
        RecordFilter(error_classes=("Undecodable",)),
        RecordFilter(error_pattern="."),
        RecordFilter(keys=(b"order-1",)),
    ):
        assert not selects(spec, junk), spec
    assert selects(RecordFilter(partitions=frozenset({0}), first_offset=3), junk)


def test_bad_filters_are_refused_with_a_message_saying_what_is_wrong():
    with pytest.raises(ConfigError, match="time range is empty"):
        RecordFilter(since=T0, until=T0)
    with pytest.raises(ConfigError, match="offset range 9-3 is empty"):
        RecordFilter(first_offset=9, last_offset=3)
    with pytest.raises(ConfigError, match="not a regular expression"):
        RecordFilter(error_pattern="(unclosed")


def test_the_fingerprint_is_the_same_for_the_same_criteria_however_written():
    a = RecordFilter(error_classes=("KeyError", "TimeoutError"), partitions=frozenset({2, 1}))
    b = RecordFilter(error_classes=("TimeoutError", "KeyError", "KeyError"), partitions=frozenset({1, 2}))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != RecordFilter(error_classes=("KeyError",)).fingerprint()
    assert RecordFilter(keys=(b"\xff",)).fingerprint() != RecordFilter(keys=(b"\xfe",)).fingerprint()


def test_to_json_lists_only_the_criteria_given():
    spec = RecordFilter(since=T0, keys=(b"\xffk",), headers=(("h", None),))
    assert spec.to_json() == {"since": "2024-05-01T12:00:00.000+00:00", "keys": ["\\xffk"], "headers": [["h", None]]}
    assert RecordFilter().to_json() == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", T0),
        ("2024-05-01T14:00:00+02:00", T0),
        ("2024-05-01T12:00:00", T0),  # no offset: UTC, as the dead-letter formats read times
        ("2024-05-01", T0 - 12 * 3600 * 1000),
        ("1714564800", T0),  # epoch seconds
        ("1714564800000", T0),  # epoch milliseconds
        ("30s", T0 - 30_000),
        ("90m", T0 - 90 * 60_000),
        ("2h", T0 - 2 * 3600_000),
        ("1.5d", T0 - 36 * 3600_000),
        ("1w", T0 - 7 * 86400_000),
        ("250ms", T0 - 250),
    ],
)
def test_times_are_read_in_every_spelling_an_operator_uses(text, expected):
    assert parse_time(text, now_ms=T0) == expected


def test_a_time_that_is_none_of_them_says_which_spellings_work():
    with pytest.raises(ConfigError, match="ISO-8601"):
        parse_time("yesterday", now_ms=T0)


def test_a_duration_ago_is_relative_and_every_other_spelling_of_a_time_is_absolute():
    assert all(is_relative(text) for text in ("2h", "90m", " 7d", "1.5h", "500ms"))
    assert not any(is_relative(text) for text in ("2024-05-01T12:00:00Z", "1714564800", "1714564800000"))


def test_a_real_run_with_a_relative_time_needs_a_named_group_to_resume():
    # "2h" resolves to another moment on each run: the default group, named after the filter, would change too.
    with pytest.raises(ConfigError) as refused:
        check_resumable({"--since": "2024-05-01T10:00:00Z", "--until": "2h"}, group=None, now_ms=T0)
    message = str(refused.value)
    # The absolute time first: with a named group, the records a moving window skips are committed for good.
    assert message.startswith("--until 2024-05-01T10:00:00Z is what '2h' means now: pass that absolute time.")
    assert "'2h' is relative to now" in message and "--group NAME" in message
    assert "the group commits the records the window skips too" in message
    check_resumable({"--since": "2h", "--until": None}, group="orders-replay", now_ms=T0)
    check_resumable({"--since": "2024-05-01T10:00:00Z", "--until": "1714564800"}, group=None, now_ms=T0)
    with pytest.raises(ConfigError, match='"group": "NAME"'):
        check_resumable({"since": "30m"}, group=None, group_option='"group": "NAME"', now_ms=T0)


def test_offset_ranges_and_headers_are_read_from_their_command_line_forms():
    assert parse_offsets("100-199") == (100, 199)
    assert parse_offsets("100-") == (100, None)
    assert parse_offsets("-199") == (None, 199)
    assert parse_offsets("7") == (7, 7)
    for bad in ("-", "a-b", ""):
        with pytest.raises(ConfigError):
            parse_offsets(bad)
    assert parse_header("tenant=acme=1") == ("tenant", b"acme=1")
    assert parse_header("tenant=") == ("tenant", b"")
    assert parse_header("tenant") == ("tenant", None)
    with pytest.raises(ConfigError):
        parse_header("=x")


@given(
    offset=st.integers(0, 1000),
    first=st.none() | st.integers(0, 1000),
    last=st.none() | st.integers(0, 1000),
)
def test_an_offset_range_selects_exactly_the_offsets_between_its_ends(offset, first, last):
    if first is not None and last is not None and first > last:
        first, last = last, first
    record = dead_letter_record(offset=offset)
    inside = (first is None or offset >= first) and (last is None or offset <= last)
    assert selects(RecordFilter(first_offset=first, last_offset=last), record) is inside
