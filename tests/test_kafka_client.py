"""The asyncio Kafka client layer, against the real broker: it never blocks the loop and loses no offset."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kafka_dlq.errors import (
    BrokerUnreachableError,
    ClientClosedError,
    ConfigError,
    KafkaClientError,
    RecordTooLargeError,
    TopicNotFoundError,
)
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, CommitMode, KafkaRecord, TransactionalProducer, next_offsets
from kafka_dlq.kafka._thread import ClientThread
from kafka_dlq.loop_lag import LoopLagProbe
from kafka_dlq.testing import KafkaServer
from tests.conftest import wait_for
from tests.helpers import committed_offsets, read_all, seed


def _consumer(bootstrap: str, group: str, topics: list[str], **kwargs) -> AsyncConsumer:
    return AsyncConsumer({"bootstrap.servers": bootstrap, "group.id": group}, topics, **kwargs)


def _records(n: int, size: int = 100) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"k{i}".encode(), f"{i:08d}".encode().ljust(size, b"."), [("seq", str(i).encode())]) for i in range(n)]


async def test_records_round_trip_with_key_value_and_headers(kafka_bootstrap, topic, group_id):
    async with AsyncProducer({"bootstrap.servers": kafka_bootstrap}) as producer:
        deliveries = [
            await producer.produce(topic, b"v%d" % i, key=b"k%d" % i, headers=[("h", b"\x00\x01"), ("n", None)])
            for i in range(5)
        ]
    assert [d.offset for d in deliveries] == [0, 1, 2, 3, 4]

    got: list[KafkaRecord] = []
    async with _consumer(kafka_bootstrap, group_id, [topic]) as consumer:
        while len(got) < 5:
            batch = await consumer.getmany(timeout=5)
            got += batch
            consumer.done_many(batch)

    assert [(r.key, r.value) for r in got] == [(b"k%d" % i, b"v%d" % i) for i in range(5)]
    assert all(r.headers == (("h", b"\x00\x01"), ("n", None)) for r in got)
    assert all(r.timestamp and r.timestamp > 1_600_000_000_000 for r in got)
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, topic, 1) == {0: 5}


async def test_a_full_local_queue_makes_send_wait_for_room_and_loses_nothing(kafka_bootstrap, topic):
    # librdkafka holds at most 10 records here; 300 sent without awaiting any delivery can only all be accepted
    # if send() waited for delivery reports to make room (BufferError answered by awaiting).
    config = {"bootstrap.servers": kafka_bootstrap, "queue.buffering.max.messages": 10}
    queued = []
    async with AsyncProducer(config) as producer:
        futures = []
        for i in range(300):
            futures.append(await producer.send(topic, b"%d" % i))
            assert producer._producer is not None
            queued.append(len(producer._producer))
        deliveries = await asyncio.gather(*futures)
    assert max(queued) <= 10
    assert [d.offset for d in deliveries] == list(range(300))


async def test_batches_larger_than_a_slice_arrive_whole_in_offset_order(kafka_bootstrap, topic, group_id):
    # The consumer builds a handed-over batch 100 records per turn of the loop; the application still gets every
    # record once, in offset order, and a waiting getmany wakes to more than one slice's worth.
    await asyncio.to_thread(seed, kafka_bootstrap, topic, _records(3000))
    got: list[KafkaRecord] = []
    sizes: list[int] = []
    async with _consumer(kafka_bootstrap, group_id, [topic], batch_size=1000) as consumer:
        while len(got) < 3000:
            batch = await consumer.getmany(max_records=1000, timeout=5)
            assert batch, f"no record within 5 s after {len(got)}"
            sizes.append(len(batch))
            got += batch
            consumer.done_many(batch)
    assert [r.offset for r in got] == list(range(3000))
    assert [r.value[:8] for r in got] == [b"%08d" % i for i in range(3000)]
    assert max(sizes) > 100, sizes
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, topic, 1) == {0: 3000}


async def test_under_full_load_the_loop_never_stalls(kafka_bootstrap, new_topic, group_id, frozen_heap):
    source, copy = await asyncio.to_thread(new_topic, 3), await asyncio.to_thread(new_topic, 3)
    total = 30_000
    payload = b"x" * 1000
    headers = [("a", b"1"), ("b", b"2"), ("c", b"3")]
    copied = 0
    async with (
        LoopLagProbe() as probe,
        AsyncProducer({"bootstrap.servers": kafka_bootstrap}) as producer,
        _consumer(kafka_bootstrap, group_id, [source]) as consumer,
    ):

        async def produce_source() -> list[asyncio.Future]:
            return [await producer.send(source, payload, key=b"%d" % i, headers=headers) for i in range(total)]

        async def settle(batch: list[KafkaRecord], futures: list[asyncio.Future]) -> None:
            await asyncio.gather(*futures)
            consumer.done_many(batch)  # done once its copy is acknowledged, while the next batches go on

        async def copy_all() -> int:
            nonlocal copied
            settling = []
            while copied < total:
                batch = await consumer.getmany(max_records=1000, timeout=5)
                futures = [await producer.send(copy, r.value, key=r.key, headers=r.headers) for r in batch]
                settling.append(asyncio.create_task(settle(batch, futures)))
                copied += len(batch)
            await asyncio.gather(*settling)
            return copied

        # Producing, consuming and copying all at once, none waiting on another: the layer's full rate.
        sent, _ = await asyncio.gather(produce_source(), copy_all())
        await asyncio.gather(*sent)
        committed = await consumer.commit()
    lag = probe.summary()
    print(f"\nloop lag under load ({total} records produced, consumed and copied at once): {lag}")
    assert copied == total
    assert sum(tp.offset for tp in committed) == total
    assert lag["max"] < 250, lag


async def test_out_of_order_completion_commits_only_the_contiguous_watermark(kafka_bootstrap, topic, group_id):
    await asyncio.to_thread(seed, kafka_bootstrap, topic, _records(100))
    not_done = {40, 70}
    async with _consumer(kafka_bootstrap, group_id, [topic]) as consumer:
        got: list[KafkaRecord] = []
        while len(got) < 100:
            got += await consumer.getmany(timeout=5)
        shuffled = [r for r in got if r.offset not in not_done]
        random.Random(7).shuffle(shuffled)
        for record in shuffled:
            consumer.done(record)
        committed = await consumer.commit()
    assert [(tp.partition, tp.offset) for tp in committed] == [(0, 40)]

    redelivered: list[KafkaRecord] = []
    async with _consumer(kafka_bootstrap, group_id, [topic]) as consumer:
        while len(redelivered) < len(not_done):
            batch = await consumer.getmany(timeout=5)
            assert batch, "expected the records that were in flight back"
            redelivered += batch
        assert await consumer.getmany(timeout=1) == []
    # Only what was in flight (not done) comes back: the commit's metadata named the records done out of order.
    assert [r.offset for r in redelivered] == sorted(not_done)


async def test_a_rebalance_while_records_are_in_flight_loses_nothing(kafka_bootstrap, new_topic, group_id):
    topic = await asyncio.to_thread(new_topic, 4)
    total = 2000
    await asyncio.to_thread(seed, kafka_bootstrap, topic, _records(total))
    processed: list[tuple[str, int]] = []
    in_flight_at_revoke: dict[str, list[int]] = {"a": [], "b": []}
    in_progress: dict[str, int] = {"a": 0, "b": 0}
    second_joining, first_revoked = asyncio.Event(), asyncio.Event()
    held: list[int] = []

    def on_revoke(name: str) -> Callable[[list[tuple[str, int]]], None]:
        def revoked(_partitions: list[tuple[str, int]]) -> None:
            in_flight_at_revoke[name].append(in_progress[name])
            if name == "a":
                first_revoked.set()

        return revoked

    async def run(name: str, consumer: AsyncConsumer, stop: asyncio.Event) -> None:
        async def handle(record: KafkaRecord) -> None:
            await asyncio.sleep(random.uniform(0.01, 0.04))
            if name == "a" and second_joining.is_set() and not held:
                # One record is still in progress when the revoke comes (the revoke waits for it): in flight
                # for certain, not by the luck of timing. Bounded, so a missing revoke fails below, not here.
                held.append(record.offset)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first_revoked.wait(), 30)
            processed.append((name, record.partition * 100_000 + record.offset))
            consumer.done(record)
            in_progress[name] -= 1

        while not stop.is_set():
            batch = await consumer.getmany(max_records=10, timeout=0.2)
            in_progress[name] += len(batch)
            await asyncio.gather(*(handle(r) for r in batch))

    stop = asyncio.Event()
    async with _consumer(kafka_bootstrap, group_id, [topic], on_revoke=on_revoke("a")) as first:
        task_a = asyncio.create_task(run("a", first, stop))
        await wait_for(lambda: len(processed) >= 300, 30, "the first member to process 300 records")
        second_joining.set()
        async with _consumer(kafka_bootstrap, group_id, [topic], on_revoke=on_revoke("b")) as second:
            task_b = asyncio.create_task(run("b", second, stop))
            await wait_for(lambda: len({o for _, o in processed}) >= total, 60, "every record processed")
            stop.set()
            await asyncio.gather(task_a, task_b)
    members = {name for name, _ in processed}
    unique = {o for _, o in processed}
    duplicates = len(processed) - len(unique)
    print(f"\nrebalance: {len(processed)} processed, {duplicates} twice, in flight at revokes {in_flight_at_revoke}")
    assert len(unique) == total
    assert members == {"a", "b"}
    assert first_revoked.is_set() and held, "the first member saw a revoke while it held a record"
    assert in_flight_at_revoke["a"][0] > 0  # the revoke of the second member's join came with records in flight
    assert duplicates <= sum(in_flight_at_revoke["a"]) + sum(in_flight_at_revoke["b"])


async def test_an_aborted_transaction_leaves_nothing_and_the_retry_commits_both(kafka_bootstrap, new_topic, group_id):
    source, sink = await asyncio.to_thread(new_topic), await asyncio.to_thread(new_topic)
    await asyncio.to_thread(seed, kafka_bootstrap, source, _records(10))
    consumer = _consumer(kafka_bootstrap, group_id, [source], commit_mode=CommitMode.EXTERNAL)
    producer = TransactionalProducer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{group_id}"})
    async with consumer, producer:

        async def copy_batch() -> list[KafkaRecord]:
            batch: list[KafkaRecord] = []
            while len(batch) < 10:
                batch += await consumer.getmany(timeout=5)
            await producer.begin()
            for record in batch:
                await producer.send(sink, record.value.upper(), key=record.key, headers=record.headers)
            await producer.send_offsets(next_offsets(batch), await consumer.group_metadata())
            return batch

        await copy_batch()
        assert await producer.flush() == 0  # the records are on the broker, in the open transaction
        await producer.abort()
        written = await asyncio.to_thread(read_all, kafka_bootstrap, sink, isolation="read_uncommitted", expected=10)
        assert len(written) == 10  # they reached the log ...
        assert await asyncio.to_thread(_read_to_end, kafka_bootstrap, sink) == []  # ... and stay invisible
        assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 1) == {0: -1001}

        await consumer.rewind()
        batch = await copy_batch()
        await producer.commit()
        consumer.done_many(batch)

    visible = await asyncio.to_thread(read_all, kafka_bootstrap, sink, expected=10)
    assert [m.key() for m in visible] == [f"k{i}".encode() for i in range(10)]
    assert await asyncio.to_thread(committed_offsets, kafka_bootstrap, group_id, source, 1) == {0: 10}


async def test_records_read_after_a_rewind_while_the_loop_is_busy_are_delivered_again(kafka_bootstrap, topic, group_id):
    # The thread wakes the loop once for the batches it puts down while the loop is busy. A rewind in between
    # (a new generation of the partition) must still be applied after the batches read before it and before those
    # read after it: built under the old generation, those would be dropped as stale, and then committed past.
    await asyncio.to_thread(seed, kafka_bootstrap, topic, _records(3000))
    async with _consumer(kafka_bootstrap, group_id, [topic], batch_size=10, max_pending=100_000) as consumer:
        first: list[KafkaRecord] = []
        while not first:
            first = await consumer.getmany(timeout=5)  # assigned and reading; nothing done, nothing committed
        thread = consumer._thread
        assert thread is not None

        def busy_until(condition, what: str) -> None:
            # The loop is kept busy (not blocked in a call): what the thread hands over meanwhile waits for it.
            deadline = time.monotonic() + 20
            while not condition():
                if time.monotonic() > deadline:
                    raise AssertionError(f"never saw {what}")

        busy_until(lambda: len(consumer._handover) > 0, "a batch put down while the loop is busy")
        generation = consumer._generation
        rewound = thread.call(consumer._rewind)
        busy_until(lambda: consumer._generation > generation, "the rewind on the consumer's thread")
        after = len(consumer._handover)
        busy_until(lambda: len(consumer._handover) >= after + 2, "batches read after the rewind")
        await rewound

        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 3000 and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout=1)
            seen.update(r.offset for r in batch)
            consumer.done_many(batch)
    assert sorted(set(range(3000)) - seen)[:20] == []


def _read_to_end(bootstrap: str, topic: str) -> list:
    """What a read_committed consumer sees of partition 0, read until its position reaches the end of the log."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"end-{time.monotonic_ns()}", "isolation.level": "read_committed"}
    )
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        seen: list = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen += [m for m in consumer.consume(100, 0.2) if m.error() is None]
            position = consumer.position([TopicPartition(topic, 0)])[0].offset
            if position >= high:
                return seen
        raise AssertionError(f"the read_committed consumer never reached offset {high} of {topic}")
    finally:
        consumer.close()


@pytest.fixture
def own_broker(tmp_path):
    server = KafkaServer(data_dir=tmp_path / "kafka")
    server.start()
    yield server
    server.stop()


async def test_a_broker_restart_mid_run_loses_no_record(own_broker: KafkaServer):
    from kafka_dlq.kafka.admin import create_topics

    bootstrap = own_broker.bootstrap_servers
    await asyncio.to_thread(create_topics, bootstrap, {"restart": 2})
    total = 6000
    seen: set[int] = set()
    async with (
        AsyncProducer({"bootstrap.servers": bootstrap}) as producer,
        _consumer(bootstrap, "restart-group", ["restart"]) as consumer,
    ):

        async def consume() -> None:
            while len(seen) < total:
                try:
                    batch = await consumer.getmany(timeout=1)
                except ClientClosedError:
                    return
                except KafkaClientError as exc:  # a transient error must not end the run; show it
                    print(f"consumer error during restart: {exc}")
                    continue
                seen.update(int(r.key) for r in batch)
                consumer.done_many(batch)

        reader = asyncio.create_task(consume())
        futures = []
        for i in range(total):
            futures.append(await producer.send("restart", b"v", key=str(i).encode()))
            if i == total // 3:
                await asyncio.to_thread(own_broker.restart)
            if i % 500 == 0:
                await asyncio.sleep(0.05)
        deliveries = await asyncio.wait_for(asyncio.gather(*futures), 120)
        try:
            await asyncio.wait_for(reader, 120)
        finally:
            print(f"restart: {len(seen)} of {total} seen")
    assert len(deliveries) == total
    assert seen == set(range(total))


async def test_while_no_acknowledgement_comes_the_loop_stops_polling_and_loses_nothing(own_broker: KafkaServer):
    # A broker that does not answer (SIGSTOP: down, paused, cut off) leaves records in flight for as long as it
    # takes. The loop must not wake every 2 ms for all that time to find no report: the producer's thread waits for
    # them instead, and every record is still delivered, in order, once the broker answers again.
    from kafka_dlq.kafka.admin import create_topics

    bootstrap = own_broker.bootstrap_servers
    await asyncio.to_thread(create_topics, bootstrap, {"paused": 1})
    pid = own_broker.process.pid
    assert pid is not None
    async with AsyncProducer({"bootstrap.servers": bootstrap}) as producer:
        await producer.produce("paused", b"before")
        loop_polls = 0
        serve = producer._serve_on_loop

        def counting(client):
            nonlocal loop_polls
            loop_polls += 1
            return serve(client)

        producer._serve_on_loop = counting  # type: ignore[method-assign]
        os.kill(pid, signal.SIGSTOP)
        try:
            futures = [await producer.send("paused", b"%d" % i) for i in range(10)]
            quiet_second = False
            for _ in range(10):  # a whole second without one poll on the loop (it ticked 500 times a second)
                before = loop_polls
                await asyncio.sleep(1.0)
                if loop_polls == before:
                    quiet_second = True
                    break
            assert quiet_second, f"the loop polled {loop_polls} times while no acknowledgement could come"
            assert not any(future.done() for future in futures)
        finally:
            os.kill(pid, signal.SIGCONT)
        deliveries = await asyncio.wait_for(asyncio.gather(*futures), 60)
    assert [delivery.offset for delivery in deliveries] == list(range(1, 11))


async def test_unknown_config_keys_are_a_clear_config_error(kafka_bootstrap, topic, group_id):
    async with LoopLagProbe() as probe:
        with pytest.raises(ConfigError, match=r"no\.such\.setting"):
            await AsyncProducer({"bootstrap.servers": kafka_bootstrap, "no.such.setting": 1}).start()
        with pytest.raises(ConfigError, match=r"no\.such\.setting"):
            await AsyncConsumer(
                {"bootstrap.servers": kafka_bootstrap, "group.id": group_id, "no.such.setting": 1}, [topic]
            ).start()
        with pytest.raises(ConfigError, match=r"group\.id"):
            AsyncConsumer({"bootstrap.servers": kafka_bootstrap}, [topic])
    assert probe.summary()["max"] < 250


async def test_an_unreachable_broker_at_start_is_a_clear_error_and_the_loop_stays_responsive():
    from kafka_dlq.testing import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    async with LoopLagProbe() as probe:
        with pytest.raises(BrokerUnreachableError, match=r"check bootstrap\.servers"):
            await AsyncProducer({"bootstrap.servers": nowhere}, connect_timeout=2).start()
        with pytest.raises(BrokerUnreachableError):
            await AsyncConsumer({"bootstrap.servers": nowhere, "group.id": "g"}, ["t"], connect_timeout=2).start()
    assert probe.summary()["max"] < 250


async def test_a_topic_that_does_not_exist_is_a_clear_error(kafka_bootstrap, group_id):
    async with LoopLagProbe() as probe:
        with pytest.raises(TopicNotFoundError, match="no-such-topic"):
            await _consumer(kafka_bootstrap, group_id, ["no-such-topic"]).start()
        async with AsyncProducer({"bootstrap.servers": kafka_bootstrap}) as producer:
            with pytest.raises(TopicNotFoundError, match="no-such-topic"):
                await producer.produce("no-such-topic", b"v")
    assert probe.summary()["max"] < 250


async def test_settings_that_weaken_durability_are_refused():
    for weaker in ({"acks": "1"}, {"acks": 0}, {"enable.idempotence": False}, {"enable.idempotence": "false"}):
        with pytest.raises(ConfigError, match=r"acks=all and enable\.idempotence=true"):
            AsyncProducer({"bootstrap.servers": "127.0.0.1:1", **weaker})
    AsyncProducer({"bootstrap.servers": "127.0.0.1:1", "acks": "all", "enable.idempotence": True})  # the defaults


async def test_a_consumer_whose_thread_dies_says_so_instead_of_waiting_forever(kafka_bootstrap, topic, group_id):
    consumer = _consumer(kafka_bootstrap, group_id, [topic])
    await consumer.start()

    def broken(_client: object) -> None:
        raise RuntimeError("a bug on the consumer's thread")

    consumer._backpressure = broken  # type: ignore[method-assign]  # the next serve step on its thread raises
    with pytest.raises(KafkaClientError, match="a bug on the consumer's thread") as raised:
        for _ in range(300):  # each getmany waits at most 0.1 s for records: a bound, not a timing
            await consumer.getmany(timeout=0.1)
    assert raised.value.fatal
    with pytest.raises(KafkaClientError):  # and it stays said: the consumer is unusable
        await consumer.getmany(timeout=0.1)
    await consumer.stop()


async def test_a_producer_whose_thread_dies_says_so_on_the_next_send(kafka_bootstrap, topic):
    producer = AsyncProducer({"bootstrap.servers": kafka_bootstrap})
    await producer.start()

    def broken() -> None:
        raise RuntimeError("a bug on the producer's thread")

    producer._dispatch = broken  # type: ignore[method-assign]  # the next serve step on its thread raises
    await wait_for(lambda: producer._thread is not None and not producer._thread.is_alive(), 10, "the thread to end")
    await wait_for(lambda: producer._fatal is not None, 10, "the producer to hear of it")
    with pytest.raises(KafkaClientError, match="a bug on the producer's thread"):
        await producer.send(topic, b"v")
    await producer.stop()


async def test_a_record_too_large_is_a_clear_error(kafka_bootstrap, new_topic):
    small = await asyncio.to_thread(new_topic, 1, {"max.message.bytes": "2000"})
    async with LoopLagProbe() as probe, AsyncProducer({"bootstrap.servers": kafka_bootstrap}) as producer:
        with pytest.raises(RecordTooLargeError, match=r"max\.message\.bytes"):
            await producer.produce(small, b"x" * 5000)  # the broker refuses it
        with pytest.raises(RecordTooLargeError):
            await producer.produce(small, b"x" * 2_000_000)  # the client refuses it
        assert (await producer.produce(small, b"fits")).offset >= 0
    assert probe.summary()["max"] < 250


async def test_a_stopped_client_refuses_reuse(kafka_bootstrap, topic, group_id):
    producer = AsyncProducer({"bootstrap.servers": kafka_bootstrap})
    await producer.start()
    await producer.stop()
    with pytest.raises(ClientClosedError):
        await producer.start()
    with pytest.raises(ClientClosedError):
        await producer.produce(topic, b"v")
    consumer = _consumer(kafka_bootstrap, group_id, [topic])
    await consumer.start()
    await consumer.stop()
    with pytest.raises(ClientClosedError):
        await consumer.start()
    with pytest.raises(ClientClosedError):
        await consumer.getmany(timeout=0.1)


def test_next_offsets_are_one_past_the_highest_per_partition():
    records = [KafkaRecord(topic="t", partition=p, offset=o) for p, o in [(0, 5), (1, 2), (0, 9), (0, 7)]]
    assert sorted((tp.partition, tp.offset) for tp in next_offsets(records)) == [(0, 10), (1, 3)]
    assert isinstance(next_offsets(records)[0], TopicPartition)


async def test_a_client_thread_waiting_between_serves_runs_a_command_and_stops_when_asked():
    # The producer's thread waits between serves while the loop serves its delivery reports; a command (flush,
    # metadata) or a stop request must not wait that out. Here the wait is far longer than the bounds below.
    loop = asyncio.get_running_loop()
    served = []

    def serve(client: object) -> None:
        served.append(client)
        thread.idle(300.0)

    thread: ClientThread[object] = ClientThread("idle-test", loop, object, serve, lambda client: None)
    thread.start()
    await asyncio.wait_for(thread.started, 10)
    await wait_for(lambda: bool(served), 10, "the thread's first serve")
    assert await asyncio.wait_for(thread.call(lambda client: 42), 10) == 42
    thread.request_stop()
    await asyncio.wait_for(thread.finished, 10)
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
