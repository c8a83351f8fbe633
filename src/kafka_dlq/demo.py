"""``kafka-dlq demo``: the dev stack and a produce/consume round trip through it."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Message, Producer
from rich.console import Console
from rich.table import Table

from kafka_dlq.dev import dev_up
from kafka_dlq.errors import KafkaDLQError
from kafka_dlq.kafka.admin import create_topics


def run_demo(*, records: int, console: Console | None) -> dict[str, Any]:
    stack = dev_up()
    if console:
        console.print(
            f"dev stack up: Kafka {stack.kafka_version} at {stack.bootstrap_servers}, "
            f"Redis {stack.redis_version} at {stack.redis_url}"
        )
    topic = f"kafka-dlq-demo-{uuid.uuid4().hex[:8]}"
    create_topics(stack.bootstrap_servers, {topic: 1})
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers, "enable.idempotence": True})
    for n in range(records):
        producer.produce(
            topic,
            key=f"key-{n}".encode(),
            value=f"value-{n}".encode(),
            headers=[("demo.seq", str(n).encode())],
        )
    if producer.flush(30) != 0:
        raise KafkaDLQError(f"the demo's records were not delivered to {stack.bootstrap_servers} in 30 s")
    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"{topic}-group",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    received: list[Message] = []
    deadline = time.monotonic() + 30
    while len(received) < records and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            received.append(msg)
    consumer.commit(asynchronous=False)
    consumer.close()
    if console:
        table = Table(title=f"round trip through {topic}")
        for col in ("partition", "offset", "key", "value", "headers"):
            table.add_column(col)
        for msg in received:
            headers = repr(msg.headers() or [])
            table.add_row(str(msg.partition()), str(msg.offset()), repr(msg.key()), repr(msg.value()), headers)
        console.print(table)
        console.print(f"{len(received)} of {records} records came back. Stop the stack with `kafka-dlq dev down`.")
    if len(received) != records:
        raise KafkaDLQError(f"only {len(received)} of {records} records came back from {topic}")
    return {"topic": topic, "produced": records, "consumed": len(received), **stack.settings()}
