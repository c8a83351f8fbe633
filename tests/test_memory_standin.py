"""The in-memory stand-in of the retrying consumer, and through it the broker-independent engine both share.

Pure: no broker. Backoffs are recorded, not waited for, so these tests say what the consumer decides, not how
long it takes.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections import Counter

import pytest

from kafka_dlq.classify import Classifier
from kafka_dlq.errors import ConfigError, KafkaClientError
from kafka_dlq.formats import decode, encode_native
from kafka_dlq.formats.native import HEADERS as NATIVE_HEADERS
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.outcomes import ParkNow, RetryLater
from kafka_dlq.policy import Backoff, Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord
from kafka_dlq.retrying import (
    MAX_IN_PLACE_ATTEMPTS,
    Attempt,
    Ordering,
    RetryEngine,
    RetryingConsumer,
    current_attempt,
    default_in_place_policy,
)
from kafka_dlq.testing import memory
from kafka_dlq.testing.memory import MemoryRetryingConsumer, StandInError

NOW = 1_700_000_000_000
POLICY = RetryPolicy(initial_delay=0.1, max_delay=2.0, multiplier=2, jitter=Jitter.NONE, max_attempts=3)
COMPLETE_HEADERS = {
    "dlq.original.topic",
    "dlq.original.partition",
    "dlq.original.offset",
    "dlq.original.timestamp",
    "dlq.original.group",
    "dlq.error.class",
    "dlq.error.message",
    "dlq.error.stacktrace",
    "dlq.attempts",
    "dlq.first.failure",
    "dlq.last.failure",
}


class Flaky:
    """A handler scripted per key: fail the first ``transient[key]`` calls, fail ``fatal`` keys always."""

    def __init__(
        self,
        transient: dict[bytes, int] | None = None,
        fatal: set[bytes] | None = None,
        always: set[bytes] | None = None,
    ) -> None:
        self.transient = transient or {}
        self.fatal = fatal or set()
        self.always = always or set()
        self.calls: Counter[bytes] = Counter()
        self.attempts: list[Attempt] = []
        self.seen: list[KafkaRecord] = []

    async def __call__(self, record: KafkaRecord) -> None:
        key = record.key or b""
        self.calls[key] += 1
        self.attempts.append(current_attempt())
        self.seen.append(record)
        if key in self.fatal:
            raise KeyError(f"order {key.decode()} does not exist")
        if key in self.always or self.calls[key] <= self.transient.get(key, 0):
            raise ConnectionError("inventory service said 503")


def consumer(handler, **kwargs) -> MemoryRetryingConsumer:
    kwargs.setdefault("policy", POLICY)
    kwargs.setdefault("group_id", "orders-service")
    return MemoryRetryingConsumer(handler, now_ms=lambda: NOW, **kwargs)


# ---------------------------------------------------------------- outcomes


async def test_a_record_that_succeeds_is_processed_once_and_committed():
    handler = Flaky()
    async with consumer(handler) as c:
        record = await c.deliver("orders", b'{"id":1}', key=b"o1")

    assert handler.calls == Counter({b"o1": 1})
    assert c.processed == [record]
    assert c.dead_letters == []
    assert c.committed() == {("orders", 0): 1}
    assert c.get_metrics() == {
        "received": 1,
        "processed": 1,
        "failed_attempts": 0,
        "retried_in_place": 0,
        "dead_lettered": 0,
        "dead_lettered_non_retryable": 0,
        "left_undone": 0,
        "released_at_revoke": 0,
        "in_flight": 0,
    }


async def test_a_transient_failure_is_retried_in_place_with_the_policys_backoff():
    handler = Flaky(transient={b"o1": 2})
    async with consumer(handler) as c:
        await c.deliver("orders", b"v", key=b"o1")

    assert handler.calls[b"o1"] == 3
    assert c.backoffs == [0.1, 0.2]
    assert [a.in_place_attempt for a in handler.attempts] == [1, 2, 3]
    assert len(c.processed) == 1 and c.dead_letters == []
    assert c.get_metrics()["retried_in_place"] == 2
    assert c.get_metrics()["failed_attempts"] == 2


async def test_a_retryable_failure_that_persists_goes_to_the_dlq_after_the_in_place_attempts():
    handler = Flaky(always={b"o1"})
    async with consumer(handler) as c:
        await c.deliver("orders", b'{"id":1}', key=b"o1", headers=[("traceparent", b"00-ab-01")], timestamp=NOW - 5)

    assert handler.calls[b"o1"] == 3
    [dead_letter] = c.dead_letters
    assert dead_letter.original == OriginalRecord(
        topic="orders",
        partition=0,
        offset=0,
        timestamp=NOW - 5,
        key=b"o1",
        value=b'{"id":1}',
        headers=(("traceparent", b"00-ab-01"),),
    )
    assert dead_letter.failure.error_class == "builtins.ConnectionError"
    assert dead_letter.failure.message == "inventory service said 503"
    assert "ConnectionError: inventory service said 503" in (dead_letter.failure.stacktrace or "")
    assert (dead_letter.attempts, dead_letter.first_failure, dead_letter.last_failure) == (3, NOW, NOW)
    assert dead_letter.group == "orders-service"
    assert dead_letter.reason is None  # in the DLQ, not parked: the DLQ handler decides what comes next
    assert c.dead_letter_records[0].topic == "orders.dlq"
    assert {name for name, _ in c.dead_letter_records[0].headers} >= COMPLETE_HEADERS
    assert c.processed == []
    assert c.committed() == {("orders", 0): 1}


async def test_a_non_retryable_failure_goes_straight_to_the_dlq():
    handler = Flaky(fatal={b"o1"})
    async with consumer(handler, classifier=Classifier(non_retryable=[KeyError])) as c:
        await c.deliver("orders", b"v", key=b"o1")

    assert handler.calls[b"o1"] == 1
    assert c.backoffs == []
    assert c.dead_letters[0].attempts == 1
    assert c.dead_letters[0].failure.error_class == "builtins.KeyError"
    assert c.get_metrics()["dead_lettered_non_retryable"] == 1


async def test_the_handler_may_ask_for_the_dlq_now_or_for_a_specific_delay():
    calls: Counter[bytes] = Counter()

    async def handle(record: KafkaRecord) -> None:
        calls[record.key or b""] += 1
        if record.key == b"park":
            raise ParkNow("customer closed the account")
        if calls[record.key or b""] == 1:
            raise RetryLater("rate limited", delay=0.75)

    async with consumer(handle) as c:
        await c.deliver("orders", b"v", key=b"park")
        await c.deliver("orders", b"v", key=b"later")

    assert calls == Counter({b"park": 1, b"later": 2})
    assert c.backoffs == [0.75]
    assert [d.failure.error_class for d in c.dead_letters] == ["kafka_dlq.outcomes.ParkNow"]
    assert [r.key for r in c.processed] == [b"later"]


# ---------------------------------------------------------------- the budget


async def test_a_backoff_that_would_overrun_the_budget_is_not_taken():
    handler = Flaky(always={b"o1"})
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=8, jitter=Jitter.NONE, max_attempts=10)

    async with consumer(handler, policy=policy, retry_budget=4) as c:
        await c.deliver("orders", b"v", key=b"o1")

    # 1 + 2 = 3 s waited; the next backoff (4 s) would make 7 > 4: off to the DLQ after the 3rd attempt.
    assert c.backoffs == [1.0, 2.0]
    assert c.dead_letters[0].attempts == 3


async def test_a_zero_budget_means_no_in_place_retry():
    handler = Flaky(always={b"o1"})
    async with consumer(handler, retry_budget=0) as c:
        await c.deliver("orders", b"v", key=b"o1")
    assert handler.calls[b"o1"] == 1
    assert c.dead_letters[0].attempts == 1


async def test_a_retry_later_with_no_delay_stops_at_the_policys_attempts():
    # RetryLater skips the classifier's limits; in place, the attempt limit holds all the same.
    calls = 0

    async def handle(record: KafkaRecord) -> None:
        nonlocal calls
        calls += 1
        raise RetryLater("not yet", delay=0)

    c = consumer(handle)
    await c.deliver("orders", b"v")
    await c.drain(timeout=5)
    await c.close()

    assert calls == 3
    assert c.backoffs == [0, 0]
    assert c.dead_letters[0].attempts == 3
    assert c.dead_letters[0].failure.error_class == "kafka_dlq.outcomes.RetryLater"


async def test_an_immediate_policy_without_an_attempt_limit_stops_at_the_in_place_cap():
    handler = Flaky(always={b"o1"})
    c = consumer(handler, policy=RetryPolicy(backoff=Backoff.IMMEDIATE, max_attempts=None))
    await c.deliver("orders", b"v", key=b"o1")
    await c.drain(timeout=5)
    await c.close()

    assert handler.calls[b"o1"] == MAX_IN_PLACE_ATTEMPTS
    assert c.dead_letters[0].attempts == MAX_IN_PLACE_ATTEMPTS


async def test_time_inside_the_handler_counts_against_the_budget():
    calls = 0

    async def slow_and_failing(record: KafkaRecord) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)  # more than the whole budget: no retry may start after it
        raise ConnectionError("inventory service said 503")

    async with consumer(slow_and_failing, retry_budget=0.25) as c:
        await c.deliver("orders", b"v")

    assert calls == 1
    assert c.backoffs == []
    assert c.dead_letters[0].attempts == 1


async def test_the_budget_runs_from_the_first_call_on_the_engines_clock():
    # Given a clock the handler moves on by 4 s per call and backoffs move on by their delay, a 10 s budget
    # and a policy of 10 attempts 0.1 s apart:
    now = [0.0]

    async def four_seconds_and_fail(record: KafkaRecord) -> None:
        now[0] += 4
        raise ConnectionError("slow and down")

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    async def write(topic: str, encoded: object, dead_letter: DeadLetter) -> None:
        written.append(dead_letter)

    written: list[DeadLetter] = []
    engine = RetryEngine(
        four_seconds_and_fail,
        group_id="g",
        write_dead_letter=write,
        mark_done=lambda record: None,
        policy=RetryPolicy(backoff=Backoff.FIXED, initial_delay=0.1, jitter=Jitter.NONE, max_attempts=10),
        retry_budget=10,
        sleep=sleep,
        clock=lambda: now[0],
    )
    await engine.submit(KafkaRecord(topic="orders", partition=0, offset=0, value=b"v"))
    assert await engine.drain(timeout=5)

    # Then calls start at 0, 4.1 and 8.2 s; after the third (12.2 s) the budget is spent.
    assert [d.attempts for d in written] == [3]
    assert engine.counters.retried_in_place == 2


@pytest.mark.parametrize(
    ("wanted", "max_poll_interval_ms", "budget"),
    [
        # Half the revoke timeout (80% of max.poll.interval.ms, 15 s at most): a last retry started just inside
        # the budget still has room to end before a revoke gives up on it.
        (60, None, 7.5),
        (60, "20000", 7.5),
        (60, "10000", 4.0),
        (60, "6000", 2.4),
        (3, None, 3.0),
    ],
)
def test_the_kafka_consumers_budget_is_capped_by_the_revoke_timeout_and_max_poll_interval(
    wanted, max_poll_interval_ms, budget
):
    async def handle(record: KafkaRecord) -> None:
        return None

    settings = {} if max_poll_interval_ms is None else {"max.poll.interval.ms": max_poll_interval_ms}
    retrying = RetryingConsumer(
        handle,
        topics=["orders"],
        group_id="g",
        bootstrap_servers="127.0.0.1:9",
        retry_budget=wanted,
        consumer_config=settings,
    )
    assert retrying.retry_budget == pytest.approx(budget)


async def test_a_handler_that_takes_too_long_times_out_and_is_retried():
    calls = 0

    async def slow_once(record: KafkaRecord) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # never returns: only the timeout ends it

    async with consumer(slow_once, handler_timeout=0.05) as c:
        await c.deliver("orders", b"v")

    assert calls == 2
    assert len(c.processed) == 1
    assert c.get_metrics()["failed_attempts"] == 1


def test_the_default_in_place_policy_is_short():
    policy = default_in_place_policy()
    assert (policy.max_attempts, policy.initial_delay, policy.max_delay) == (3, 0.1, 2.0)


# ---------------------------------------------------------------- redrive


def redriven(*, attempts: int, redrive_count: int, first_failure: int, spring: bool = False) -> KafkaRecord:
    """A record as the DLQ handler's republish mode sends it back: the original plus native dlq.* headers."""
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(
                topic="orders", partition=0, offset=3, key=b"o1", value=b"v", headers=(("traceparent", b"00-ab"),)
            ),
            failure=Failure(error_class="builtins.ConnectionError", message="503"),
            attempts=attempts,
            first_failure=first_failure,
            last_failure=first_failure + 1000,
            group="orders-service",
            redrive_count=redrive_count,
        ),
        spring_compatible=spring,
    )
    return KafkaRecord(
        topic="orders", partition=0, offset=40, key=encoded.key, value=encoded.value, headers=encoded.headers
    )


async def test_a_redriven_record_reaches_the_handler_without_the_dead_letter_headers():
    handler = Flaky()
    async with consumer(handler) as c:
        await c.submit(redriven(attempts=4, redrive_count=1, first_failure=NOW - 60_000, spring=True))

    assert handler.seen[0].headers == (("traceparent", b"00-ab"),)
    assert handler.attempts == [Attempt(attempt=5, in_place_attempt=1, redrive_count=1, first_failure=NOW - 60_000)]


async def test_a_redriven_record_that_fails_again_carries_its_history_into_the_next_dead_letter():
    handler = Flaky(always={b"o1"})
    async with consumer(handler) as c:
        await c.submit(redriven(attempts=4, redrive_count=2, first_failure=NOW - 60_000))

    # The in-place policy counts this delivery (3 attempts); the dead letter counts the record's whole life.
    assert handler.calls[b"o1"] == 3
    [dead_letter] = c.dead_letters
    assert dead_letter.attempts == 4 + 3
    assert dead_letter.first_failure == NOW - 60_000
    assert dead_letter.last_failure == NOW
    assert dead_letter.redrive_count == 2
    assert (dead_letter.original.topic, dead_letter.original.offset) == ("orders", 40)
    assert dead_letter.original.headers == (("traceparent", b"00-ab"),)
    names = [name for name, _ in c.dead_letter_records[0].headers]
    assert all(names.count(name) <= 1 for name in NATIVE_HEADERS)  # fresh headers replace the stale ones


async def test_a_record_with_only_the_redrive_loop_guard_keeps_its_count_and_loses_the_header():
    handler = Flaky(fatal={b"o1"})
    record = KafkaRecord(
        topic="orders", partition=0, offset=0, key=b"o1", value=b"v", headers=(("a", b"1"), ("dlq.redrive.count", b"3"))
    )
    async with consumer(handler, classifier=Classifier(non_retryable=[KeyError])) as c:
        await c.submit(record)

    assert handler.seen[0].headers == (("a", b"1"),)
    assert handler.attempts[0] == Attempt(attempt=1, in_place_attempt=1, redrive_count=3, first_failure=None)
    assert c.dead_letters[0].redrive_count == 3
    assert c.dead_letters[0].attempts == 1


async def test_a_record_back_from_a_redrive_with_its_attempts_and_first_failure_carries_them_forward():
    # What `kafka-dlq redrive` leaves on a record it sends back: the attempts and first failure, and its loop
    # guard; the rest of the dead letter's dlq.* headers are removed.
    handler = Flaky(always={b"o1"})
    record = KafkaRecord(
        topic="orders",
        partition=0,
        offset=9,
        key=b"o1",
        value=b"v",
        headers=(
            ("traceparent", b"00-ab"),
            ("dlq.attempts", b"4"),
            ("dlq.first.failure", str(NOW - 60_000).encode()),
            ("dlq.redrive.count", b"1"),
        ),
    )
    async with consumer(handler) as c:
        await c.submit(record)

    assert all(seen.headers == (("traceparent", b"00-ab"),) for seen in handler.seen)
    assert handler.attempts[0] == Attempt(attempt=5, in_place_attempt=1, redrive_count=1, first_failure=NOW - 60_000)
    assert [a.attempt for a in handler.attempts] == [5, 6, 7]
    [dead_letter] = c.dead_letters
    assert (dead_letter.attempts, dead_letter.first_failure, dead_letter.redrive_count) == (4 + 3, NOW - 60_000, 1)
    assert dead_letter.original.headers == (("traceparent", b"00-ab"),)


async def test_a_redriven_history_out_of_range_is_not_carried_into_a_dead_letter_that_could_not_be_read():
    handler = Flaky(fatal={b"o1"})
    record = KafkaRecord(
        topic="orders",
        partition=0,
        offset=0,
        key=b"o1",
        value=b"v",
        headers=(("dlq.attempts", b"999999999999"), ("dlq.first.failure", b"999999999999999999")),
    )
    async with consumer(handler, classifier=Classifier(non_retryable=[KeyError])) as c:
        await c.submit(record)

    assert handler.attempts[0] == Attempt(attempt=1, in_place_attempt=1, redrive_count=0, first_failure=None)
    [dead_letter] = c.dead_letters
    assert (dead_letter.attempts, dead_letter.first_failure) == (1, NOW)


async def test_a_carried_attempt_count_at_the_formats_limit_stays_there_so_the_next_dead_letter_decodes():
    # Given a record back from a redrive with as many attempts as a dead letter can say (MAX_ATTEMPTS),
    handler = Flaky(always={b"o1"})
    record = KafkaRecord(
        topic="orders", partition=0, offset=0, key=b"o1", value=b"v", headers=(("dlq.attempts", b"1000000"),)
    )
    # when it fails again (three times in place),
    async with consumer(handler) as c:
        await c.submit(record)

    # then its attempts stay at the limit, in the handler and in a dead letter that decodes.
    assert [a.attempt for a in handler.attempts] == [1_000_000] * 3
    [dead_letter] = c.dead_letters
    assert dead_letter.attempts == 1_000_000
    assert c.committed() == {("orders", 0): 1}


async def test_current_attempt_outside_a_handler_says_where_it_works():
    with pytest.raises(LookupError, match="only available inside a handler"):
        current_attempt()


# ---------------------------------------------------------------- sync handlers, concurrency, ordering


async def test_a_sync_handler_runs_in_a_thread_and_sees_its_attempt():
    loop_thread = threading.get_ident()
    seen: list[tuple[int, int]] = []

    def handle(record: KafkaRecord) -> None:
        seen.append((threading.get_ident(), current_attempt().in_place_attempt))
        if len(seen) == 1:
            raise ConnectionError("once")

    async with consumer(handle) as c:
        await c.deliver("orders", b"v")

    assert [attempt for _, attempt in seen] == [1, 2]
    assert all(thread != loop_thread for thread, _ in seen)
    assert len(c.processed) == 1


async def test_no_more_records_run_at_once_than_the_concurrency_limit():
    running = 0
    peak = 0
    full = asyncio.Event()
    release = asyncio.Event()

    async def handle(record: KafkaRecord) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            full.set()
        await release.wait()
        running -= 1

    c = consumer(handle, concurrency=4)
    feeding = asyncio.gather(*[c.deliver("orders", b"v", partition=i) for i in range(10)])
    await asyncio.wait_for(full.wait(), 5)
    for _ in range(20):  # give the other six every chance to start, were a slot free
        await asyncio.sleep(0)
    assert running == 4  # the others wait for a slot
    release.set()
    await feeding
    await c.drain()
    await c.close()
    assert peak == 4
    assert len(c.processed) == 10


async def test_unordered_a_later_record_of_a_key_overtakes_one_in_retry():
    order: list[int] = []

    async def handle(record: KafkaRecord) -> None:
        if record.offset == 0 and current_attempt().in_place_attempt == 1:
            raise ConnectionError("once")
        order.append(record.offset)

    async with consumer(handle) as c:
        await c.deliver("orders", b"v", key=b"k")
        await c.deliver("orders", b"v", key=b"k")

    assert order == [1, 0]


async def test_with_key_ordering_a_later_record_waits_behind_the_one_in_retry():
    events: list[tuple[bytes, int, str]] = []
    others_done = asyncio.Event()

    async def handle(record: KafkaRecord) -> None:
        key = record.key or b""
        events.append((key, record.offset, "start"))
        if key == b"a" and record.offset == 0:
            if current_attempt().in_place_attempt == 1:
                raise ConnectionError("once")
            await others_done.wait()  # key b goes on meanwhile: only key a waits
        if key == b"b" and record.offset == 5:
            others_done.set()
        events.append((key, record.offset, "end"))

    async with consumer(handle, ordering=Ordering.KEY) as c:
        for offset, key in enumerate([b"a", b"b", b"a", b"b", b"a", b"b"]):
            record = await c.deliver("orders", b"v", key=key)
            assert record.offset == offset

    for key in (b"a", b"b"):
        starts = [offset for k, offset, kind in events if k == key and kind == "start"]
        assert starts == sorted(starts)
    # Record 2 of key a starts only after record 0 of key a has ended.
    assert events.index((b"a", 2, "start")) > events.index((b"a", 0, "end"))
    assert len(c.processed) == 6


async def test_with_key_ordering_a_later_record_follows_a_dead_lettered_one_only_once_it_is_written():
    seen_dead_letters: list[int] = []
    c: MemoryRetryingConsumer

    async def handle(record: KafkaRecord) -> None:
        if record.offset == 0:
            raise KeyError("gone")
        seen_dead_letters.append(len(c.dead_letters))

    c = consumer(handle, ordering=Ordering.KEY, classifier=Classifier(non_retryable=[KeyError]))
    async with c:
        await c.deliver("orders", b"v", key=b"a")
        await c.deliver("orders", b"v", key=b"a")

    assert seen_dead_letters == [1]


async def test_with_key_ordering_records_waiting_behind_a_key_hold_slots_so_intake_stays_bounded():
    # Given a concurrency of 2 and a key whose first record is held up,
    release = asyncio.Event()
    order: list[int] = []

    async def handle(record: KafkaRecord) -> None:
        if record.offset == 0:
            await release.wait()
        order.append(record.offset)

    c = consumer(handle, ordering=Ordering.KEY, concurrency=2)
    # when six more records of that key arrive,
    feeding = asyncio.gather(*[c.deliver("orders", b"v", key=b"hot") for _ in range(7)])
    for _ in range(20):
        await asyncio.sleep(0)
    # then only one waits behind it: the rest stay with the client, as they would in Kafka.
    assert c.get_metrics()["received"] == 2
    assert c.engine.free_slots == 0
    release.set()
    await feeding
    await c.drain()
    await c.close()
    assert order == list(range(7))


async def test_with_key_ordering_a_dead_letter_that_cannot_be_written_stops_its_key_without_marking_the_rest_done():
    # Given key ordering, and a dead-letter topic that refuses the first record's dead letter for good,
    done: list[int] = []
    handled: list[int] = []
    errors: list[BaseException] = []
    released: list[int] = []
    refused = KafkaClientError("topic authorization failed", fatal=True)

    async def handle(record: KafkaRecord) -> None:
        handled.append(record.offset)
        if record.offset == 0:
            raise KeyError("gone")

    async def write(topic: str, encoded: object, dead_letter: DeadLetter) -> None:
        raise refused

    engine = RetryEngine(
        handle,
        group_id="g",
        write_dead_letter=write,
        mark_done=lambda record: done.append(record.offset),
        classifier=Classifier(non_retryable=[KeyError]),
        ordering=Ordering.KEY,
        on_error=errors.append,
        release=lambda record: released.append(record.offset),
    )

    def record(offset: int, key: bytes) -> KafkaRecord:
        return KafkaRecord(topic="orders", partition=0, offset=offset, key=key, value=b"v")

    # when later records of its key (and another key's) arrive behind it, and one more of its key afterwards,
    for offset, key in enumerate([b"a", b"a", b"b", b"a"]):
        await engine.submit(record(offset, key))
    assert await engine.drain(timeout=5)
    await engine.submit(record(4, b"a"))
    assert await engine.drain(timeout=5)

    # then the failure is reported, key a's later records neither ran nor were marked done (they are read again
    # after a restart, behind the first), and key b went on;
    assert errors == [refused]
    assert handled == [0, 2]
    assert done == [2]
    assert engine.metrics()["left_undone"] == 4
    assert engine.in_flight == 0
    assert engine.free_slots == engine.concurrency
    # and every record given up was handed back, so that its source no longer waits for it (a revoke would).
    assert released == [0, 1, 3, 4]


async def test_with_key_ordering_a_stopped_key_runs_again_once_its_partition_was_revoked():
    # Given a key stopped on partition 0 by a dead letter that could not be written,
    handled: list[tuple[int, int]] = []
    refuse = True

    async def handle(record: KafkaRecord) -> None:
        handled.append((record.partition, record.offset))
        raise KeyError("gone")

    async def write(topic: str, encoded: object, dead_letter: DeadLetter) -> None:
        if refuse:
            raise KafkaClientError("topic authorization failed", fatal=True)

    engine = RetryEngine(
        handle,
        group_id="g",
        write_dead_letter=write,
        mark_done=lambda record: None,
        classifier=Classifier(non_retryable=[KeyError]),
        ordering=Ordering.KEY,
        on_error=lambda error: None,
    )

    def record(partition: int, offset: int) -> KafkaRecord:
        return KafkaRecord(topic="orders", partition=partition, offset=offset, key=b"a", value=b"v")

    await engine.submit(record(0, 0))
    assert await engine.drain(timeout=5)
    refuse = False
    # when another partition is revoked, the key stays stopped;
    engine.revoke([("orders", 1)])
    await engine.submit(record(0, 1))
    assert await engine.drain(timeout=5)
    assert handled == [(0, 0)]
    # but once its own partition is revoked (and comes back, read again from the record that stopped it),
    assert engine.revoke([("orders", 0)]) == 0
    await engine.submit(record(0, 0))
    assert await engine.drain(timeout=5)
    # then the key runs again.
    assert handled == [(0, 0), (0, 0)]
    assert engine.metrics()["dead_lettered"] == 1


async def test_with_key_ordering_a_revoke_hands_back_the_records_waiting_behind_their_key():
    # Given key ordering and key a's first record on partition 0 in progress, with two more of key a queued behind
    # it, one more of key a from partition 1 behind those, and key b's record on partition 0 running alone,
    release = asyncio.Event()
    started: list[tuple[int, int]] = []
    done: list[tuple[int, int]] = []
    released: list[tuple[int, int]] = []

    async def handle(record: KafkaRecord) -> None:
        started.append((record.partition, record.offset))
        if (record.partition, record.offset) == (0, 0):
            await release.wait()

    engine = RetryEngine(
        handle,
        group_id="g",
        write_dead_letter=lambda topic, encoded, dead_letter: asyncio.sleep(0),
        mark_done=lambda record: done.append((record.partition, record.offset)),
        ordering=Ordering.KEY,
        concurrency=8,
        release=lambda record: released.append((record.partition, record.offset)),
    )

    def record(partition: int, offset: int, key: bytes) -> KafkaRecord:
        return KafkaRecord(topic="orders", partition=partition, offset=offset, key=key, value=b"v")

    for partition, offset, key in [(0, 0, b"a"), (0, 1, b"a"), (0, 2, b"a"), (1, 0, b"a"), (0, 3, b"b")]:
        await engine.submit(record(partition, offset, key))
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == [(0, 0), (0, 3)]
    # when partition 0 is revoked,
    assert engine.revoke([("orders", 0)]) == 2
    # then the two waiting records of partition 0 are handed back at once, their slots free, while the running
    # one goes on;
    assert released == [(0, 1), (0, 2)]
    assert engine.free_slots == 8 - 2  # taken: key a's running record, and partition 1's behind it (b is done)
    assert engine.metrics()["released_at_revoke"] == 2
    release.set()
    assert await engine.drain(timeout=5)
    # the records handed back never run here (the next owner reads them); partition 1's record of the key still
    # runs after the one before it.
    assert started == [(0, 0), (0, 3), (1, 0)]
    assert sorted(done) == [(0, 0), (0, 3), (1, 0)]
    assert engine.in_flight == 0
    assert engine.free_slots == 8


@pytest.mark.parametrize("ordering", [Ordering.UNORDERED, Ordering.KEY])
async def test_records_cancelled_before_their_first_step_give_back_their_slots_and_their_key(ordering):
    # Given two records of one key taken in, whose tasks have not run a single step yet,
    handled: list[int] = []

    async def handle(record: KafkaRecord) -> None:
        handled.append(record.offset)

    c = consumer(handle, ordering=ordering, concurrency=4)
    await c.deliver("orders", b"v", key=b"a")
    await c.deliver("orders", b"v", key=b"a")
    # when they are cancelled (a forced stop),
    assert await c.engine.cancel() == 2
    # then their slots are free again, and a later record of that key runs.
    assert c.engine.free_slots == 4
    later = await c.deliver("orders", b"v", key=b"a")
    await c.drain(timeout=5)
    await c.close()
    assert handled == [later.offset]
    assert c.engine.free_slots == 4


async def test_with_key_ordering_records_without_a_key_run_unordered():
    order: list[int] = []

    async def handle(record: KafkaRecord) -> None:
        if record.offset == 0 and current_attempt().in_place_attempt == 1:
            raise ConnectionError("once")
        order.append(record.offset)

    async with consumer(handle, ordering=Ordering.KEY) as c:
        await c.deliver("orders", b"v")
        await c.deliver("orders", b"v")

    assert order == [1, 0]


# ---------------------------------------------------------------- formats and commits


async def test_spring_compatible_dead_letters_carry_springs_headers_and_decode_to_the_same_dead_letter():
    handler = Flaky(fatal={b"o1"})
    async with consumer(handler, spring_compatible=True, classifier=Classifier(non_retryable=[KeyError])) as c:
        await c.deliver("orders", b"v", key=b"o1", timestamp=NOW - 5)

    written = c.dead_letter_records[0]
    spring = dict(written.headers)
    assert spring["kafka_dlt-original-topic"] == b"orders"
    assert spring["kafka_dlt-original-partition"] == struct.pack(">i", 0)
    assert spring["kafka_dlt-original-offset"] == struct.pack(">q", 0)
    assert spring["kafka_dlt-original-timestamp"] == struct.pack(">q", NOW - 5)
    assert spring["kafka_dlt-exception-fqcn"] == b"builtins.KeyError"
    decoded = decode(written)
    assert isinstance(decoded, DeadLetter)
    assert decoded.original == OriginalRecord(
        topic="orders", partition=0, offset=0, timestamp=NOW - 5, key=b"o1", value=b"v"
    )
    assert (decoded.attempts, decoded.group, decoded.failure.error_class) == (1, "orders-service", "builtins.KeyError")
    # Written again, the decoded dead letter gives the very same headers: the round trip loses nothing.
    assert encode_native(decoded, spring_compatible=True).headers == written.headers


async def test_dead_letters_go_where_dlq_topic_says():
    handler = Flaky(fatal={b"o1"})
    classifier = Classifier(non_retryable=[KeyError])
    async with consumer(handler, classifier=classifier, dlq_topic=lambda topic: f"dead.{topic}") as c:
        await c.deliver("orders", b"v", key=b"o1")
    assert c.dead_letter_records[0].topic == "dead.orders"


async def test_the_source_offset_is_done_only_once_the_dead_letter_is_written():
    written = asyncio.Event()
    done: list[int] = []

    async def write(topic: str, encoded: object, dead_letter: DeadLetter) -> None:
        await written.wait()

    async def fail(record: KafkaRecord) -> None:
        raise KeyError("gone")

    engine = RetryEngine(
        fail,
        group_id="g",
        write_dead_letter=write,
        mark_done=lambda record: done.append(record.offset),
        classifier=Classifier(non_retryable=[KeyError]),
    )
    await engine.submit(KafkaRecord(topic="orders", partition=0, offset=0, value=b"v"))
    assert not await engine.drain(timeout=0.05)
    assert done == []  # the dead letter is not durable yet
    written.set()
    assert await engine.drain(timeout=5)
    assert done == [0]


async def test_the_commit_waits_for_the_slowest_record_before_it():
    gate = asyncio.Event()

    async def handle(record: KafkaRecord) -> None:
        if record.offset == 1:
            await gate.wait()

    c = consumer(handle)
    for _ in range(4):
        await c.deliver("orders", b"v")
    for _ in range(10):
        await asyncio.sleep(0)
    assert c.committed() == {("orders", 0): 1}
    gate.set()
    await c.drain()
    await c.close()
    assert c.committed() == {("orders", 0): 4}


# ---------------------------------------------------------------- failures inside kafka-dlq


async def test_a_failure_inside_kafka_dlq_is_raised_by_drain_not_left_in_a_list():
    def broken_rule(context: object) -> None:
        raise RuntimeError("rule has a bug")

    handler = Flaky(always={b"o1"})
    c = consumer(handler, classifier=Classifier(rule=broken_rule))
    await c.deliver("orders", b"v", key=b"o1")

    with pytest.raises(StandInError, match="rule has a bug") as raised:
        await c.drain()
    await c.close()
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert c.committed() == {}  # no durable outcome: nothing to commit
    assert c.get_metrics()["left_undone"] == 1


async def test_a_dead_letter_that_does_not_decode_back_fails_the_drain(monkeypatch):
    monkeypatch.setattr(memory, "decode", lambda record: decode(with_a_broken_topic_header(record)))
    handler = Flaky(fatal={b"o1"})

    with pytest.raises(StandInError, match="cannot read back"):
        async with consumer(handler, classifier=Classifier(non_retryable=[KeyError])) as c:
            await c.deliver("orders", b"v", key=b"o1")
    assert c.dead_letters == []
    assert c.committed() == {}


def with_a_broken_topic_header(record: KafkaRecord) -> KafkaRecord:
    """The record with its original topic header broken, as a bug in the encoder would leave it."""
    headers = tuple((n, b"" if n == "dlq.original.topic" else v) for n, v in record.headers)
    return KafkaRecord(topic=record.topic, partition=record.partition, offset=record.offset, headers=headers)


async def test_handler_exceptions_are_outcomes_not_errors():
    handler = Flaky(fatal={b"o1"}, always={b"o2"})
    async with consumer(handler, classifier=Classifier(non_retryable=[KeyError])) as c:
        await c.deliver("orders", b"v", key=b"o1")
        await c.deliver("orders", b"v", key=b"o2")
    assert c.errors == []
    assert len(c.dead_letters) == 2


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("concurrency", 0, "concurrency must be an int >= 1"),
        ("retry_budget", -1, "retry_budget must be a finite number of seconds"),
        ("handler_timeout", 0, "handler_timeout must be a finite number of seconds > 0"),
        ("ordering", "key", "ordering must be Ordering.UNORDERED or Ordering.KEY"),
        ("dlq_topic", "", "dlq_topic is empty"),
        ("policy", 3, "policy must be a RetryPolicy"),
    ],
)
def test_wrong_settings_are_config_errors_that_name_the_setting(setting, value, message):
    async def handle(record: KafkaRecord) -> None:
        return None

    with pytest.raises(ConfigError, match=message):
        MemoryRetryingConsumer(handle, **{setting: value})


async def test_a_closed_stand_in_refuses_records():
    c = consumer(Flaky())
    await c.close()
    with pytest.raises(Exception, match="closed"):
        await c.deliver("orders", b"v")
