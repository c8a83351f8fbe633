"""``TopicReader``: reads exactly what a topic held when reading started, with no group and no commits."""

from __future__ import annotations

import asyncio
import threading

import pytest
from confluent_kafka import Producer

from kafka_dlq.errors import TopicNotFoundError
from kafka_dlq.kafka.inspect import committed_offsets
from kafka_dlq.kafka.reader import TopicReader, Watermarks
from tests.helpers import seed


def records(n: int, prefix: str = "r") -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    return [(f"{prefix}{i}".encode(), f"value-{i}".encode(), [("n", str(i).encode())]) for i in range(n)]


async def test_reads_every_partition_to_the_end_captured_at_start_and_no_further(kafka_bootstrap, new_topic):
    topic = await asyncio.to_thread(new_topic, 3)
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records(3000))
    config = {"bootstrap.servers": kafka_bootstrap, "group.id": "reader-test-group"}

    async with TopicReader(config, [topic], batch_size=500) as reader:
        marks = dict(reader.watermarks)
        await asyncio.to_thread(seed, kafka_bootstrap, topic, records(100, "late"))  # after start: not read
        seen: list[tuple[int, int, bytes | None]] = []
        async for batch in reader.batches():
            assert len(batch) <= 500
            seen += [(r.partition, r.offset, r.key) for r in batch]

    assert sum(m.span for m in marks.values()) == 3000
    assert len(seen) == 3000
    assert not any(key.startswith(b"late") for _, _, key in seen if key)
    for (_, partition), mark in marks.items():
        offsets = [offset for p, offset, _ in seen if p == partition]
        assert offsets == list(range(mark.low, mark.high))  # in order, each once
    # No group was joined and nothing committed, even with a group id in the settings.
    assert await asyncio.to_thread(committed_offsets, config, "reader-test-group") == {}


async def test_reads_chosen_ranges_and_may_leave_values_in_the_client(kafka_bootstrap, new_topic):
    topic = await asyncio.to_thread(new_topic, 2)
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records(200))

    async with TopicReader({"bootstrap.servers": kafka_bootstrap}, [topic]) as reader:
        high = reader.watermarks[(topic, 1)].high
        ranged = [r async for batch in reader.batches({(topic, 1): 5}, end={(topic, 1): 15}) for r in batch]
        tail = [r async for batch in reader.batches({(topic, 0): 10**9}) for r in batch]  # past the end: nothing
        bare = [r async for batch in reader.batches(values=False) for r in batch]
        by_time = await reader.offsets_for_time(0)

    assert [(r.partition, r.offset) for r in ranged] == [(1, offset) for offset in range(5, 15)]
    assert all(r.value is not None and r.value.startswith(b"value-") for r in ranged)
    assert tail == []
    assert len(bare) == 200
    assert all(r.value is None and r.key is not None and r.header("n") is not None for r in bare)
    assert by_time == {(topic, 0): 0, (topic, 1): 0}
    assert high > 15


async def test_fold_runs_the_step_on_the_readers_thread_and_reports_progress_on_the_loop(kafka_bootstrap, new_topic):
    topic = await asyncio.to_thread(new_topic, 2)
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records(1000))
    loop_thread = threading.get_ident()
    step_threads: set[int] = set()
    progress_threads: set[int] = set()
    progress: list[int] = []
    keys: set[bytes | None] = set()

    def step(batch):
        step_threads.add(threading.get_ident())
        keys.update(r.key for r in batch)

    def report(read: int) -> None:
        progress_threads.add(threading.get_ident())
        progress.append(read)

    async with TopicReader({"bootstrap.servers": kafka_bootstrap}, [topic], batch_size=100) as reader:
        total = await reader.fold(step, progress=report)
        await asyncio.sleep(0)  # the last progress call is queued on the loop

    assert total == 1000 == len(keys)
    assert loop_thread not in step_threads
    assert progress_threads == {loop_thread}
    assert progress == sorted(progress) and progress[-1] == 1000


async def test_ends_behind_transaction_markers_and_skips_aborted_records(kafka_bootstrap, new_topic, unique_name):
    topic = await asyncio.to_thread(new_topic, 1)

    def transactions() -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_name("txn")})
        producer.init_transactions(30)
        for commit in (True, False, True):
            producer.begin_transaction()
            for i in range(5):
                producer.produce(topic, value=b"kept" if commit else b"aborted", key=str(i).encode())
            producer.flush(30)  # an abort drops what is not sent yet: the aborted records must be in the log
            if commit:
                producer.commit_transaction(30)
            else:
                producer.abort_transaction(30)

    await asyncio.to_thread(transactions)

    async with TopicReader({"bootstrap.servers": kafka_bootstrap}, [topic], idle_timeout=20) as reader:
        marks = reader.watermarks[(topic, 0)]
        values = [r.value async for batch in reader.batches() for r in batch]

    assert marks == Watermarks(0, 18)  # 15 records and 3 markers, the last offset a marker
    assert values == [b"kept"] * 10


async def test_a_missing_topic_is_reported_at_start(kafka_bootstrap):
    with pytest.raises(TopicNotFoundError, match="no-such-topic"):
        async with TopicReader({"bootstrap.servers": kafka_bootstrap}, ["no-such-topic"]):
            pass
