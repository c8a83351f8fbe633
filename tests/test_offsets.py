"""The done-watermark and its commit metadata, property by property (pure, no broker)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kafka_dlq.kafka.offsets import PartitionOffsets, decode_done, encode_done


@given(st.integers(0, 10**12), st.sets(st.integers(1, 5000), max_size=300))
def test_done_offsets_round_trip_through_the_commit_metadata(base, distances):
    done = {base + d for d in distances}
    metadata = encode_done(base, done)
    assert len(metadata) <= 3500
    assert decode_done(base, metadata) == done


def test_metadata_too_long_leaves_out_the_highest_offsets_only():
    done = set(range(1, 20_000, 2))  # every other offset: thousands of ranges
    kept = decode_done(0, encode_done(0, done))
    assert kept and kept < done
    assert max(kept) < min(done - kept)  # what is left out is only read again, never skipped


@given(st.text(max_size=40))
def test_foreign_metadata_names_nothing(text):
    assert decode_done(100, text) == set() or text.startswith("kdlq1:")


@given(st.text(alphabet="0123456789-,x ", max_size=40))
def test_damaged_metadata_of_ours_never_names_an_offset_at_or_below_the_base(text):
    # Ours by its prefix, but anything after it: decoding never raises, and names only offsets above the base
    # (a record at or below the committed offset was never done out of order; skipping it would lose it).
    assert all(offset > 100 for offset in decode_done(100, "kdlq1:" + text))


def test_damaged_metadata_of_ours_names_nothing():
    for damaged in ("kdlq1:x", "kdlq1:5-3", "kdlq1:0", "kdlq1:-4", "kdlq1:1-9999999999", "kdlq1:3,x"):
        assert decode_done(100, damaged) == set(), damaged


@given(st.lists(st.integers(0, 199), unique=True), st.randoms())
def test_the_watermark_is_one_past_the_longest_done_prefix(done_offsets, rnd):
    offsets = PartitionOffsets(1)
    offsets.delivered_many(list(range(200)))
    order = list(done_offsets)
    rnd.shuffle(order)
    for offset in order:
        offsets.done(offset)
    done = set(done_offsets)
    prefix = next((o for o in range(200) if o not in done), 200)
    assert offsets.watermark == (prefix if prefix else None)
    assert offsets.pending == set(range(200)) - done
    point = offsets.commit_point()
    if done:
        assert point is not None
        base, metadata = point
        assert base == prefix if prefix else base == 0
        assert decode_done(base, metadata) == {o for o in done if o > base}


def test_a_released_record_holds_the_watermark():
    offsets = PartitionOffsets(1)
    offsets.delivered_many([10, 11, 12])
    offsets.release(10)
    offsets.done_many([11, 12])
    assert offsets.watermark is None
    assert offsets.commit_point() == (10, encode_done(10, {11, 12}))
