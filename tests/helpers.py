"""Test helpers that talk to the real broker: seeding topics and reading them back, plainly."""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, Producer, TopicPartition


def seed(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]
) -> int:
    """Produce ``(key, value, headers)`` records synchronously (call from sync code or a thread); returns the count."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, "message.max.bytes": 16_000_000}
    )
    count = 0
    for key, value, headers in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
    assert producer.flush(60) == 0
    return count


def read_all(
    bootstrap: str,
    topic: str,
    *,
    isolation: str = "read_committed",
    idle: float = 3.0,
    expected: int | None = None,
    extra: float = 0.0,
) -> list:
    """Every record of ``topic`` from the beginning (no group commits), until ``idle`` seconds bring nothing.

    With ``expected``, reading stops once that many are read (however long they take, while records keep
    coming within ``idle``), then goes on ``extra`` seconds more to catch any duplicate beyond them.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.subscribe([topic])
    out = []
    last = time.monotonic()
    while time.monotonic() - last < idle and (expected is None or len(out) < expected):
        for msg in consumer.consume(1000, 0.2):
            if msg.error() is None:
                out.append(msg)
                last = time.monotonic()
    more_until = time.monotonic() + extra
    while time.monotonic() < more_until:
        out.extend(msg for msg in consumer.consume(1000, 0.2) if msg.error() is None)
    consumer.close()
    return out


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        result = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in result}
