"""The retrying consumer against the real broker: failed records reach the DLQ with their whole story, offsets are
committed only behind durable outcomes, and a restart repeats only what was not committed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, TopicPartition

from kafka_dlq.classify import Classifier
from kafka_dlq.errors import ConfigError, TopicNotFoundError
from kafka_dlq.formats import EncodedRecord, SourceFormat, decode, encode_native
from kafka_dlq.handler import DLQHandler, Mode
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.kafka._thread import ClientState
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.loop_lag import LoopLagProbe
from kafka_dlq.policy import Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, OriginalRecord
from kafka_dlq.retrying import Attempt, Ordering, RetryingConsumer, current_attempt
from tests.conftest import wait_for
from tests.helpers import committed_offsets, read_all, seed

FAST = RetryPolicy(initial_delay=0.01, max_delay=0.02, jitter=Jitter.NONE, max_attempts=3)
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


def as_record(message) -> KafkaRecord:
    ts_type, ts = message.timestamp()
    return KafkaRecord(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        timestamp=ts if ts_type else None,
        key=message.key(),
        value=message.value(),
        headers=tuple(message.headers() or ()),
    )


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "end-offsets"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()


def retrying(handler, kafka_bootstrap: str, group_id: str, source: str, dlq: str, **kwargs) -> RetryingConsumer:
    kwargs.setdefault("policy", FAST)
    return RetryingConsumer(
        handler, topics=[source], group_id=group_id, bootstrap_servers=kafka_bootstrap, dlq_topic=dlq, **kwargs
    )


@pytest.fixture
def topics(new_topic: Callable[..., str]) -> Callable[..., tuple[str, str]]:
    """A source topic and its DLQ topic."""

    def make(partitions: int = 1) -> tuple[str, str]:
        return new_topic(partitions, None, "orders"), new_topic(1, None, "orders.dlq")

    return make


@pytest.mark.slow
async def test_ten_thousand_records_with_failures_and_a_forced_restart_lose_nothing_and_repeat_only_the_uncommitted(
    kafka_bootstrap, topics, group_id
):
    # Given 10,000 records: 1 in 100 fails retryably every time, 1 in 100 fatally, 1 in 100 once (then succeeds).
    source, dlq = await asyncio.to_thread(topics, 4)
    total = 10_000
    await asyncio.to_thread(
        seed, kafka_bootstrap, source, [(f"k{i}".encode(), str(i).encode(), [("n", b"%d" % i)]) for i in range(total)]
    )
    retryable = {i for i in range(total) if i % 100 == 17}
    fatal = {i for i in range(total) if i % 100 == 53}
    transient = {i for i in range(total) if i % 100 == 71}
    phase = "first"
    deliveries: dict[str, Counter[int]] = {"first": Counter(), "second": Counter()}
    completed: Counter[int] = Counter()
    finished: dict[str, set[int]] = {"first": set(), "second": set()}
    dead_lettered: dict[str, set[int]] = {"first": set(), "second": set()}
    position: dict[int, tuple[int, int]] = {}

    async def handle(record: KafkaRecord) -> None:
        i = int(record.value or b"")
        position[i] = (record.partition, record.offset)
        attempt = current_attempt()
        if attempt.in_place_attempt == 1:
            deliveries[phase][i] += 1
        await asyncio.sleep(0.001)  # a real suspension point: many records are in flight at once
        if i in retryable:
            raise ConnectionError(f"inventory service said 503 for {i}")
        if i in fatal:
            raise KeyError(f"order {i} does not exist")
        if i in transient and attempt.in_place_attempt == 1:
            raise TimeoutError("inventory service too slow")
        completed[i] += 1
        finished[phase].add(i)

    class Observed(RetryingConsumer):
        """Notes each dead letter once its delivery report came: such a record's outcome is durable."""

        async def _write_dead_letter(self, topic: str, encoded: EncodedRecord, dead_letter: DeadLetter) -> None:
            await super()._write_dead_letter(topic, encoded, dead_letter)
            dead_lettered[phase].add(int(dead_letter.original.value or b""))

    def consumer() -> RetryingConsumer:
        return Observed(
            handle,
            topics=[source],
            group_id=group_id,
            bootstrap_servers=kafka_bootstrap,
            dlq_topic=dlq,
            policy=FAST,
            classifier=Classifier(non_retryable=[KeyError]),
        )

    # When the first consumer is stopped by force a third of the way through ...
    probe = LoopLagProbe()
    probe.start()
    first = consumer()
    running = asyncio.create_task(first.run())
    await wait_for(lambda: sum(completed.values()) >= 3000, 60, "3000 records handled")
    in_flight_at_stop = first.get_metrics()["in_flight"]
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    first_metrics = first.get_metrics()
    committed_at_stop = await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 4)
    uncommitted = {i for i in deliveries["first"] if position[i][1] >= max(0, committed_at_stop[position[i][0]])}
    left = total - sum(max(0, offset) for offset in committed_at_stop.values())

    # ... and a second one of the same group takes over and runs to the end.
    phase = "second"
    second = consumer()
    ends = await asyncio.to_thread(end_offsets, kafka_bootstrap, source, 4)
    async with second:
        deadline = asyncio.get_running_loop().time() + 90
        while await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 4) != ends:
            assert asyncio.get_running_loop().time() < deadline, f"the {left} records left were not all handled"
            await asyncio.sleep(0.5)
    second_metrics = second.get_metrics()
    await probe.stop()

    # Then offsets are committed to the end,
    assert sum(ends.values()) == total
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 4) == ends
    # every record was delivered, and only what the first consumer had in flight (delivered, neither finished nor
    # dead-lettered) was delivered twice: records done out of order above the committed offset are named in the
    # commit's metadata and skipped,
    repeated = set(deliveries["first"]) & set(deliveries["second"])
    in_flight = set(deliveries["first"]) - finished["first"] - dead_lettered["first"]
    print(
        f"\nforced restart: {in_flight_at_stop} in flight before, {first_metrics['left_undone']} cancelled at the "
        f"stop, {len(uncommitted)} delivered but not committed, "
        f"{len(in_flight)} delivered and not finished, "
        f"{len(repeated)} delivered again; first {first_metrics}; second {second_metrics}; "
        f"loop lag (ms) {probe.summary()}"
    )
    assert set(deliveries["first"]) | set(deliveries["second"]) == set(range(total))
    assert all(count == 1 for count in deliveries["first"].values())
    assert all(count == 1 for count in deliveries["second"].values())
    assert repeated <= uncommitted
    # and exactly those: every record the first consumer left without an outcome was read again, none was lost,
    assert repeated == in_flight
    # and they are no more than the first consumer counted in flight when it was stopped: the records its stop
    # cancelled without an outcome (read just before the cancel, the in_flight metric can miss a batch taken in
    # meanwhile).
    assert len(in_flight) <= first_metrics["left_undone"]
    assert first_metrics["in_flight"] == 0
    # every record that can succeed succeeded, once unless it was repeated,
    succeeding = set(range(total)) - retryable - fatal
    assert set(completed) == succeeding
    assert all(completed[i] == 1 for i in succeeding - repeated)
    # and every failed record is in the DLQ, with its whole story.
    # Read until the topic is idle, not until the expected count: a duplicate must be seen to be counted.
    dead = await asyncio.to_thread(read_all, kafka_bootstrap, dlq, idle=3)
    by_record: dict[int, list[dict[str, bytes]]] = {}
    for message in dead:
        by_record.setdefault(int(message.value()), []).append(dict(message.headers()))
    assert set(by_record) == retryable | fatal
    assert dead_lettered["first"] | dead_lettered["second"] == retryable | fatal
    assert not dead_lettered["first"] & dead_lettered["second"]  # none written again once its report came
    # Exactly one dead letter per failed record; a second copy only for a record in flight at the restart whose
    # report had not come (at least once), never more than one per delivery.
    written = Counter({i: len(found) for i, found in by_record.items()})
    assert all(written[i] == 1 for i in (retryable | fatal) - repeated), written
    assert all(written[i] <= 2 for i in (retryable | fatal) & repeated), written
    for i, copies in by_record.items():
        headers = copies[0]
        assert set(headers) >= COMPLETE_HEADERS, i
        assert headers["dlq.original.topic"] == source.encode()
        assert (int(headers["dlq.original.partition"]), int(headers["dlq.original.offset"])) == position[i]
        assert headers["dlq.original.group"] == group_id.encode()
        assert int(headers["dlq.first.failure"]) <= int(headers["dlq.last.failure"])
        if i in retryable:
            assert headers["dlq.error.class"] == b"builtins.ConnectionError"
            assert headers["dlq.attempts"] == b"3"
        else:
            assert headers["dlq.error.class"] == b"builtins.KeyError"
            assert headers["dlq.attempts"] == b"1"
        assert b"Traceback" in headers["dlq.error.stacktrace"]
    assert first_metrics["retried_in_place"] + second_metrics["retried_in_place"] >= 2 * len(retryable) + len(transient)


async def test_a_handler_slower_than_max_poll_interval_keeps_the_consumer_in_its_group(
    kafka_bootstrap, topics, group_id
):
    source, dlq = await asyncio.to_thread(topics)
    await asyncio.to_thread(seed, kafka_bootstrap, source, [(b"k", b"%d" % i, []) for i in range(3)])
    calls: Counter[int] = Counter()

    async def handle(record: KafkaRecord) -> None:
        calls[record.offset] += 1
        if record.offset == 0:
            await asyncio.sleep(8)  # longer than max.poll.interval.ms: the client thread keeps polling meanwhile

    consumer = retrying(
        handle,
        kafka_bootstrap,
        group_id,
        source,
        dlq,
        consumer_config={"max.poll.interval.ms": 6000, "session.timeout.ms": 6000},
    )
    async with consumer:
        await wait_for(lambda: consumer.get_metrics()["processed"] == 3, 30, "all 3 records processed")
        metrics = consumer.get_metrics()

    assert calls == Counter({0: 1, 1: 1, 2: 1})
    assert (metrics["partitions_assigned"], metrics["partitions_revoked"]) == (1, 0)  # never left the group
    assert metrics["dead_lettered"] == 0
    assert consumer.retry_budget == pytest.approx(2.4)  # half of the revoke timeout, 80% of max.poll.interval.ms
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 1) == {0: 3}


async def test_a_spring_compatible_dead_letter_decodes_back_to_the_same_dead_letter(kafka_bootstrap, topics, group_id):
    source, dlq = await asyncio.to_thread(topics)
    await asyncio.to_thread(seed, kafka_bootstrap, source, [(b"order-1", b'{"id":1}', [("traceparent", b"00-ab")])])

    async def handle(record: KafkaRecord) -> None:
        raise KeyError("order 1 does not exist")

    consumer = retrying(
        handle,
        kafka_bootstrap,
        group_id,
        source,
        dlq,
        classifier=Classifier(non_retryable=[KeyError]),
        spring_compatible=True,
    )
    async with consumer:
        await wait_for(lambda: consumer.get_metrics()["dead_lettered"] == 1, 30, "the dead letter")

    [original] = [as_record(m) for m in await asyncio.to_thread(read_all, kafka_bootstrap, source, expected=1)]
    [written] = [as_record(m) for m in await asyncio.to_thread(read_all, kafka_bootstrap, dlq, expected=1)]
    dead_letter = decode(written)
    assert isinstance(dead_letter, DeadLetter)
    assert dead_letter.source_format is SourceFormat.NATIVE
    assert dead_letter.original == OriginalRecord(
        topic=source,
        partition=0,
        offset=0,
        timestamp=original.timestamp,
        key=b"order-1",
        value=b'{"id":1}',
        headers=(("traceparent", b"00-ab"),),
    )
    assert (dead_letter.failure.error_class, dead_letter.failure.message) == (
        "builtins.KeyError",
        "'order 1 does not exist'",
    )
    assert (dead_letter.attempts, dead_letter.group) == (1, group_id)
    # Written again, the decoded dead letter gives the very same headers, byte for byte: nothing was lost.
    assert encode_native(dead_letter, spring_compatible=True).headers == written.headers
    # A Java tool that reads only Spring's headers reads the same story.
    spring_only = dataclasses.replace(written, headers=tuple(h for h in written.headers if not h[0].startswith("dlq.")))
    as_spring = decode(spring_only)
    assert isinstance(as_spring, DeadLetter) and as_spring.source_format is SourceFormat.SPRING
    assert as_spring.original == dead_letter.original
    assert as_spring.failure == dead_letter.failure
    assert as_spring.group == dead_letter.group


async def test_with_key_ordering_a_later_record_never_overtakes_an_earlier_one_in_retry(
    kafka_bootstrap, topics, group_id
):
    source, dlq = await asyncio.to_thread(topics)
    keys = [b"a", b"b", b"a", b"b", b"a", b"b", b"c", b"c"]
    await asyncio.to_thread(seed, kafka_bootstrap, source, [(key, b"v", []) for key in keys])
    events: list[tuple[bytes, int, str]] = []
    b_done = asyncio.Event()
    dead_lettered_when_c_went_on: list[int] = []
    consumer: RetryingConsumer

    async def handle(record: KafkaRecord) -> None:
        key, offset = record.key or b"", record.offset
        events.append((key, offset, "start"))
        if (key, offset) == (b"a", 0):
            if current_attempt().in_place_attempt == 1:
                raise ConnectionError("once")
            # Key b must get through while key a waits: a partition-wide wait would never set this.
            await asyncio.wait_for(b_done.wait(), 20)
        if (key, offset) == (b"b", 5):
            b_done.set()
        if (key, offset) == (b"c", 6):
            raise KeyError("gone")
        if (key, offset) == (b"c", 7):
            dead_lettered_when_c_went_on.append(consumer.get_metrics()["dead_lettered"])
        events.append((key, offset, "end"))

    consumer = retrying(
        handle,
        kafka_bootstrap,
        group_id,
        source,
        dlq,
        ordering=Ordering.KEY,
        classifier=Classifier(non_retryable=[KeyError]),
    )
    async with consumer:
        await wait_for(lambda: consumer.get_metrics()["processed"] == 7, 30, "7 records processed")

    for key in (b"a", b"b", b"c"):
        starts = [offset for k, offset, kind in events if k == key and kind == "start"]
        assert starts == sorted(starts), key
    assert events.index((b"a", 2, "start")) > events.index((b"a", 0, "end"))
    assert events.index((b"a", 4, "start")) > events.index((b"a", 2, "end"))
    assert dead_lettered_when_c_went_on == [1]  # c's second record waited for the first's dead letter
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 1) == {0: 8}


async def test_with_key_ordering_a_rebalance_hands_back_the_records_waiting_behind_a_key_in_retry(
    kafka_bootstrap, topics, group_id, caplog
):
    # Given ten records of one key, each failing for its whole in-place budget (about 1 s), under key ordering: run
    # one after the other they take twice the revoke timeout (4.8 s here),
    source, dlq = await asyncio.to_thread(topics)
    total = 10
    await asyncio.to_thread(seed, kafka_bootstrap, source, [(b"hot", b"%d" % i, []) for i in range(total)])
    first_calls: Counter[int] = Counter()

    async def handle(record: KafkaRecord) -> None:
        if current_attempt().in_place_attempt == 1:
            first_calls[record.offset] += 1
        raise ConnectionError("inventory service said 503")

    def member() -> RetryingConsumer:
        return retrying(
            handle,
            kafka_bootstrap,
            group_id,
            source,
            dlq,
            ordering=Ordering.KEY,
            policy=RetryPolicy(backoff="fixed", initial_delay=0.3, jitter=Jitter.NONE, max_attempts=10),
            retry_budget=1.0,
            consumer_config={"max.poll.interval.ms": 6000, "session.timeout.ms": 6000},
        )

    first = member()
    async with first:
        await wait_for(lambda: first_calls[0] == 1, 30, "the first record in retry")
        # when a second member joins the group while the key is in retry,
        second = member()
        async with second:
            await wait_for(lambda: first.get_metrics()["partitions_revoked"] >= 1, 30, "the rebalance")
            deadline = asyncio.get_running_loop().time() + 60
            while await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 1) != {0: total}:
                assert asyncio.get_running_loop().time() < deadline, "the records were not all dead-lettered"
                await asyncio.sleep(0.5)
    metrics = first.get_metrics()

    # then the records still waiting behind the key were handed back at the revoke, which waited only for the
    # one running (it did not give up on records in progress),
    assert metrics["released_at_revoke"] >= 1
    assert not [r for r in caplog.records if "still in progress at revoke" in r.getMessage()]
    # and the partition's next owner read them: each record was run by one member only, and dead-lettered once.
    assert first_calls == Counter(range(total))
    dead = await asyncio.to_thread(read_all, kafka_bootstrap, dlq, idle=2)
    assert sorted(int(message.value()) for message in dead) == list(range(total))


async def test_a_record_redriven_by_the_dlq_handler_carries_its_attempts_until_it_is_parked(
    kafka_bootstrap, redis_url, topics, group_id, unique_name
):
    # Given a record that fails every time, a retrying consumer that sends each failure straight to the DLQ, and a
    # DLQ handler that republishes dead letters to their original topic, up to 3 attempts in all.
    source, dlq = await asyncio.to_thread(topics)
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
    await asyncio.to_thread(seed, kafka_bootstrap, source, [(b"order-1", b"v", [("traceparent", b"00-ab")])])
    seen: list[tuple[Attempt, KafkaRecord]] = []

    async def handle(record: KafkaRecord) -> None:
        seen.append((current_attempt(), record))
        raise ConnectionError("billing said 503")

    consumer = retrying(handle, kafka_bootstrap, group_id, source, dlq, retry_budget=0)
    handler = DLQHandler(
        name=unique_name("redrive"),
        topics=[dlq],
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        mode=Mode.REPUBLISH,
        policies=RetryPolicy(initial_delay=0.05, max_delay=0.1, max_attempts=3),
    )
    async with consumer, handler:
        await wait_for(lambda: handler.get_metrics()["parked"] == 1, 30, "the record parked after 3 attempts")

    # Then each delivery saw the original record and the attempt it was in, the first failure carried along,
    assert [attempt.attempt for attempt, _ in seen] == [1, 2, 3]
    assert all(record.headers == (("traceparent", b"00-ab"),) for _, record in seen)
    first_failure = seen[1][0].first_failure
    assert first_failure is not None and seen[2][0].first_failure == first_failure
    # and the dead letters counted the record's whole life.
    dead = [decode(as_record(m)) for m in await asyncio.to_thread(read_all, kafka_bootstrap, dlq, expected=3)]
    assert [d.attempts for d in dead if isinstance(d, DeadLetter)] == [1, 2, 3]
    assert {d.first_failure for d in dead if isinstance(d, DeadLetter)} == {first_failure}
    [parked] = [decode(as_record(m)) for m in await asyncio.to_thread(read_all, kafka_bootstrap, f"{dlq}.poison")]
    assert isinstance(parked, DeadLetter)
    assert (parked.attempts, parked.reason, parked.first_failure) == (3, "max_attempts", first_failure)
    assert parked.original.headers == (("traceparent", b"00-ab"),)


async def test_a_stop_whose_consumer_fails_to_close_still_closes_the_rest_and_ends_run(
    kafka_bootstrap, topics, group_id, monkeypatch
):
    # Given a running consumer whose Kafka consumer raises as it closes,
    source, dlq = await asyncio.to_thread(topics)
    consumer = retrying(_noop, kafka_bootstrap, group_id, source, dlq)
    running = asyncio.create_task(consumer.run())
    await wait_for(lambda: consumer.get_metrics()["partitions_assigned"] == 1, 30, "the assignment")
    kafka_consumer, producer = consumer._consumer, consumer._producer
    assert kafka_consumer is not None and producer is not None
    close = kafka_consumer.stop

    async def failing_stop(timeout: float = 30.0) -> None:
        await close(timeout)
        raise RuntimeError("close failed")

    monkeypatch.setattr(kafka_consumer, "stop", failing_stop)
    # when it is stopped, the error is raised,
    with pytest.raises(RuntimeError, match="close failed"):
        await consumer.stop()
    # and yet the producer is closed too, and run() returns.
    assert producer.state is ClientState.CLOSED
    await asyncio.wait_for(running, 10)


async def test_a_missing_dlq_topic_is_a_clear_error_at_start(kafka_bootstrap, topic, group_id):
    async def handle(record: KafkaRecord) -> None:
        return None

    consumer = RetryingConsumer(handle, topics=[topic], group_id=group_id, bootstrap_servers=kafka_bootstrap)
    with pytest.raises(TopicNotFoundError, match=rf"{topic}\.dlq"):
        await consumer.start()
    await consumer.stop()


def _noop(record: KafkaRecord) -> None:
    return None


def test_the_in_place_budget_is_capped_at_half_of_the_revoke_timeout():
    consumer = RetryingConsumer(
        _noop,
        topics=["orders"],
        group_id="g",
        bootstrap_servers="127.0.0.1:9",
        retry_budget=60,
        consumer_config={"max.poll.interval.ms": "10000"},
    )
    assert consumer.retry_budget == 4.0  # the revoke timeout is 8 s, 80% of max.poll.interval.ms
    default = RetryingConsumer(_noop, topics=["orders"], group_id="g", bootstrap_servers="127.0.0.1:9")
    assert default.retry_budget == 7.5  # the revoke timeout is 15 s at most
    assert default.dlq_topic_for("orders") == "orders.dlq"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topics": []}, "topics must be a non-empty list"),
        ({"topics": "orders"}, "topics must be a non-empty list"),
        ({"group_id": ""}, "group_id is missing"),
        ({"bootstrap_servers": None}, "no brokers"),
        ({"dlq_topic": "orders"}, "would loop"),
        ({"kafka_config": {"group.id": "other"}}, "give the group once"),
        ({"consumer_config": {"group.id": "other"}}, "give the group once"),
        ({"concurrency": 0}, "concurrency must be an int >= 1"),
    ],
)
def test_wrong_settings_are_config_errors_that_say_what_to_do(kwargs, message):
    settings = {"topics": ["orders"], "group_id": "g", "bootstrap_servers": "127.0.0.1:9", **kwargs}
    with pytest.raises(ConfigError, match=message):
        RetryingConsumer(_noop, **settings)
