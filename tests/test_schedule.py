"""The Redis schedule's own promises: entry bodies that keep every byte, and a schedule write that claims at once."""

from __future__ import annotations

import base64
import json
import time

from hypothesis import given
from hypothesis import strategies as st

from kafka_dlq.outcomes import Outcome
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.schedule import Entry, RedisSchedule, decode_entry, encode_entry

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


def entry(offset: int, **changes: object) -> Entry:
    dl = DeadLetter(
        original=OriginalRecord(topic="orders", partition=0, offset=offset, key=b"k%d" % offset, value=b"v"),
        failure=Failure(error_class="builtins.RuntimeError", message="boom"),
        dlq=DlqCoordinates(topic="orders.dlq", partition=0, offset=offset),
    )
    return Entry(dead_letter=dl, **changes)  # type: ignore[arg-type]


_maybe_bytes = st.none() | st.binary(max_size=64)
_text = st.none() | st.text(max_size=64)  # any code points, lone surrogates among them


@given(
    key=_maybe_bytes,
    value=_maybe_bytes,
    headers=st.lists(st.tuples(st.text(max_size=16), _maybe_bytes), max_size=4),
    message=_text,
    stacktrace=_text,
    error_class=_text,
    group=_text,
    extra=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    numbers=st.tuples(st.integers(0, 2**31 - 1), st.none() | st.integers(0, 2**63 - 1)),
    last_delay=st.none() | st.floats(min_value=0, max_value=1e6),
)
def test_an_entry_body_gives_back_every_byte_and_field(
    key, value, headers, message, stacktrace, error_class, group, extra, numbers, last_delay
):
    given_entry = Entry(
        dead_letter=DeadLetter(
            original=OriginalRecord(
                topic="orders",
                partition=numbers[0],
                offset=numbers[1],
                timestamp=numbers[1],
                key=key,
                value=value,
                headers=tuple(headers),
            ),
            failure=Failure(error_class=error_class, message=message, stacktrace=stacktrace),
            attempts=numbers[0],
            first_failure=numbers[1],
            last_failure=numbers[1],
            group=group,
            redrive_count=numbers[0],
            source_format="spring",
            dlq=DlqCoordinates(topic="orders.dlq", partition=numbers[0], offset=numbers[0]),
            extra=extra,
        ),
        handler_failures=numbers[0],
        last_delay=last_delay,
    )
    assert decode_entry(encode_entry(given_entry)) == given_entry


def test_an_entry_body_holds_the_records_bytes_as_they_are_not_in_base64():
    value = bytes(range(256)) * 4
    body = encode_entry(
        Entry(
            dead_letter=DeadLetter(
                original=OriginalRecord(topic="orders", value=value),
                dlq=DlqCoordinates(topic="orders.dlq", partition=0, offset=1),
            )
        )
    )
    assert value in body
    assert len(body) < len(value) + 200


def test_a_body_written_by_an_earlier_version_as_json_still_reads():
    # What an entry scheduled before the upgrade holds: JSON, bytes in base64.
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    old = json.dumps(
        {
            "o": ["orders", 0, 5, 1_700_000_000_000, b64(b"k"), b64(b"\xff\x00v")],
            "h": [["trace", b64(b"t1")], ["empty", None]],
            "f": ["builtins.TimeoutError", "timed out", "Traceback ..."],
            "a": [3, 1_700_000_000_000, 1_700_000_001_000, 1],
            "g": "orders-service",
            "s": "native",
            "d": ["orders.dlq", 2, 9],
            "x": {"connector": "sink"},
            "hf": 2,
            "ld": 1.5,
        }
    ).encode()

    decoded = decode_entry(old)

    dl = decoded.dead_letter
    assert dl.original == OriginalRecord(
        topic="orders",
        partition=0,
        offset=5,
        timestamp=1_700_000_000_000,
        key=b"k",
        value=b"\xff\x00v",
        headers=(("trace", b"t1"), ("empty", None)),
    )
    assert dl.failure == Failure(error_class="builtins.TimeoutError", message="timed out", stacktrace="Traceback ...")
    assert (dl.attempts, dl.first_failure, dl.last_failure, dl.redrive_count) == (
        3,
        1_700_000_000_000,
        1_700_000_001_000,
        1,
    )
    assert (dl.group, dl.dlq, dict(dl.extra)) == (
        "orders-service",
        DlqCoordinates(topic="orders.dlq", partition=2, offset=9),
        {"connector": "sink"},
    )
    assert (decoded.handler_failures, decoded.last_delay) == (2, 1.5)


async def test_a_schedule_write_claims_at_once_up_to_its_limit_only_entries_due_now(redis_url, unique_name):
    async with RedisSchedule(redis_url, unique_name("addclaim")) as schedule:
        now = now_ms()
        entries = [(entry(i), now - 1000) for i in range(3)] + [(entry(3), now + HOUR_MS)]

        added, claimed = await schedule.add_and_claim(entries, 2, lease=30, now_ms=now)

        assert added == 4
        assert [c.entry for c in claimed] == [entry(0), entry(1)]  # the entries given, not read back
        assert len({c.token for c in claimed}) == 1 and claimed[0].claimed_at_ms == now
        assert await schedule.pending() == {"due": 2, "inflight": 2, "total": 4}
        lease = await schedule.client.zscore(schedule.keys["inflight"], entry(0).id)
        assert lease == now + 30_000
        # Nobody else can claim what was claimed here; the rest is there for any claim.
        others, _ = await schedule.claim(10, 30)
        assert [c.entry.id for c in others] == [entry(2).id]
        # A claim taken by the write ends as any other does.
        assert await schedule.finish(claimed[0], Outcome.RECOVERED)
        assert await schedule.finish(claimed[1], Outcome.RETRY, due_ms=now + HOUR_MS)
        assert await schedule.pending() == {"due": 2, "inflight": 1, "total": 3}


async def test_a_schedule_write_sent_again_hands_over_the_claims_its_first_run_took(redis_url, unique_name):
    # redis-py sends a script again after its connection dropped; the first run may have claimed entries, and the
    # second must still hand them over, or they would sit in flight, unused, for a whole lease.
    async with RedisSchedule(redis_url, unique_name("resend")) as schedule:
        now = now_ms()
        k = schedule.keys
        keys = [k["due"], k["inflight"], k["body"], k["claims"], k["done"]]
        bodies = [b"%d %s\n%s" % (now - 1, entry(i).id.encode(), encode_entry(entry(i))) for i in range(2)]
        args = [2, 1, now, now + 30_000, "the-calls-token", *bodies]

        first = await schedule._write("schedule", keys, args)
        again = await schedule._write("schedule", keys, args)
        someone_else = await schedule._write("schedule", keys, [*args[:4], "another-token", *bodies])

        assert [int(flag) for flag in first] == [2, 1]
        assert [int(flag) for flag in again] == [2, 0]
        assert [int(flag) for flag in someone_else] == [0, 0]
        assert await schedule.pending() == {"due": 1, "inflight": 1, "total": 2}


async def test_a_schedule_write_leaves_alone_and_claims_nothing_of_what_is_scheduled_or_finished(
    redis_url, unique_name
):
    async with RedisSchedule(redis_url, unique_name("addclaim")) as schedule:
        now = now_ms()
        await schedule.add([(entry(0), now - 1000), (entry(1), now - 1000)])
        first, _ = await schedule.claim(1, 30)
        assert await schedule.finish(first[0], Outcome.RECOVERED)  # one finished, one still due

        # Read again from Kafka (a rebalance, a restart before the commit): both are known already.
        added, claimed = await schedule.add_and_claim([(entry(0), now), (entry(1), now), (entry(2), now)], 10, 30)

        assert (added, [c.entry.id for c in claimed]) == (1, [entry(2).id])
        assert await schedule.pending() == {"due": 1, "inflight": 1, "total": 2}


async def test_a_claim_taken_by_a_schedule_write_comes_back_to_due_when_its_lease_expires(redis_url, unique_name):
    # Its instance died before it finished: the entry was in Redis all along, and any instance claims it again.
    async with RedisSchedule(redis_url, unique_name("addclaim")) as schedule:
        now = now_ms()
        _, claimed = await schedule.add_and_claim([(entry(0), now - 9000)], 1, lease=1, now_ms=now - 5000)
        assert len(claimed) == 1

        again, _ = await schedule.claim(10, 30)

        assert [c.entry for c in again] == [entry(0)]
        assert again[0].token != claimed[0].token
        assert not await schedule.finish(claimed[0], Outcome.RECOVERED)  # the dead claim's finish is refused
        assert await schedule.finish(again[0], Outcome.RECOVERED)


async def test_a_retry_rescheduled_here_is_claimed_back_from_memory_only_while_its_body_is_that_finishs(
    redis_url, unique_name
):
    async with RedisSchedule(redis_url, unique_name("reclaim")) as schedule:
        now = now_ms()
        await schedule.add([(entry(i), now - 1000) for i in range(3)])
        first, _ = await schedule.claim(3, 30)
        by_id = {c.entry.id: c for c in first}
        updated = {i: entry(i, handler_failures=1) for i in range(3)}
        for i in range(3):
            due = now - 500 if i < 2 else now + HOUR_MS
            assert await schedule.finish(by_id[entry(i).id], Outcome.RETRY, entry=updated[i], due_ms=due)
        # Entry 1 is claimed and rescheduled by another instance meanwhile: its body is that instance's now.
        taken, _ = await schedule.claim(1, 30)
        other = taken[0]
        assert other.entry.id in (entry(0).id, entry(1).id)
        assert await schedule.finish(other, Outcome.RETRY, entry=other.entry, due_ms=now - 100)
        held = [(updated[i], by_id[entry(i).id].token) for i in range(3)]

        again = await schedule.reclaim(held, lease=30)

        # Only the entry whose last finish is still this instance's and that is due: the given entry, no body read.
        assert [c.entry for c in again] == [updated[i] for i in range(2) if entry(i).id != other.entry.id]
        assert await schedule.pending() == {"due": 2, "inflight": 1, "total": 3}
        assert await schedule.finish(again[0], Outcome.RECOVERED)
        # What it left is claimed the usual way, with its body.
        rest, _ = await schedule.claim(10, 30)
        assert [c.entry.id for c in rest] == [other.entry.id]
