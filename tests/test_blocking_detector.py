"""The blocking-call detector is on in async tests and catches blocking calls on the loop, Kafka's included."""

from __future__ import annotations

import time

import pytest
from blockbuster import BlockingError
from confluent_kafka import Consumer, Producer, TopicPartition


async def test_a_blocking_kafka_poll_on_the_loop_is_caught(kafka_bootstrap, group_id):
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    try:
        with pytest.raises(BlockingError, match="poll"):
            consumer.poll(1.0)
        with pytest.raises(BlockingError, match="consume"):
            consumer.consume(10, timeout=0.5)
        with pytest.raises(BlockingError, match="commit"):
            consumer.commit(asynchronous=False)
        with pytest.raises(BlockingError, match="commit"):
            consumer.commit(None, None, False)  # the same, by position
        with pytest.raises(BlockingError, match="get_watermark_offsets"):
            consumer.get_watermark_offsets(TopicPartition("t", 0), 1.0)
        with pytest.raises(BlockingError, match="offsets_for_times"):
            consumer.offsets_for_times([TopicPartition("t", 0, 0)], 1.0)
        assert consumer.poll(0) is None  # a zero timeout cannot wait, so it is allowed
    finally:
        with pytest.raises(BlockingError, match="close"):
            consumer.close()


async def test_a_blocking_flush_on_the_loop_is_caught(kafka_bootstrap):
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    with pytest.raises(BlockingError, match="flush"):
        producer.flush(1.0)
    with pytest.raises(BlockingError, match="purge"):
        producer.purge()
    producer.purge(blocking=False)  # does not wait for in-flight requests: allowed
    producer.poll(0)


async def test_time_sleep_on_the_loop_is_caught():
    with pytest.raises(BlockingError):
        time.sleep(0.01)  # noqa: ASYNC251 - the point of the test


def test_sync_tests_may_block(kafka_bootstrap, group_id):
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    consumer.poll(0.1)
    consumer.close()
