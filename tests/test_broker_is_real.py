"""The broker the tests run on is a real Apache Kafka: groups, headers, transactions and durable logs."""

from __future__ import annotations

import re
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.testing import KafkaServer
from kafka_dlq.testing.pytest_plugin import _REPORT


def _consume(
    bootstrap: str,
    topic: str,
    group: str,
    expected: int,
    *,
    isolation: str = "read_uncommitted",
    idle_seconds: float = 20.0,
) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records = []
    deadline = time.monotonic() + idle_seconds
    while time.monotonic() < deadline and len(records) < expected:
        for msg in consumer.consume(100, 0.5):
            if msg.error() is None:
                records.append(msg)
    consumer.commit(asynchronous=False) if records else None
    consumer.close()
    return records


def test_records_with_headers_round_trip_through_a_consumer_group(kafka_bootstrap, new_topic, group_id):
    topic = new_topic(partitions=3)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    sent = {f"key-{n}".encode(): f"value-{n}".encode() for n in range(30)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value, headers=[("h1", key), ("h2", b"\x00\xff")])
    assert producer.flush(30) == 0

    records = _consume(kafka_bootstrap, topic, group_id, expected=30)

    assert {m.key(): m.value() for m in records} == sent
    assert all(m.headers() == [("h1", m.key()), ("h2", b"\x00\xff")] for m in records)
    assert {m.partition() for m in records} == {0, 1, 2}
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    committed = probe.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    probe.close()
    assert sum(tp.offset for tp in committed) == 30


def test_read_committed_sees_committed_transactions_and_not_aborted_ones(kafka_bootstrap, topic, group_id):
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-1")
    producer.produce(topic, value=b"committed-2")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-3")
    producer.commit_transaction(30)

    committed_view = _consume(kafka_bootstrap, topic, group_id, expected=4, isolation="read_committed", idle_seconds=5)
    raw_view = _consume(kafka_bootstrap, topic, group_id + "-raw", expected=4, idle_seconds=10)

    assert [m.value() for m in committed_view] == [b"committed-1", b"committed-2", b"committed-3"]
    assert b"aborted" in [m.value() for m in raw_view]


def test_a_broker_restarted_on_its_data_folder_still_has_its_records(tmp_path: Path):
    with KafkaServer(data_dir=tmp_path / "kafka") as kafka:
        assert kafka.format_seconds is not None  # a new folder is formatted before the broker starts
        create_topics(kafka.bootstrap_servers, {"durable": 2})
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "acks": "all"})
        for n in range(50):
            producer.produce("durable", key=str(n).encode(), value=b"x" * n)
        assert producer.flush(30) == 0
        del producer
        before = kafka.process.popen
        assert before is not None
        kafka.ready_seconds = None

        kafka.restart()

        # A new broker process, not the old one left running: the old one exited, the new one was waited for.
        assert before.poll() is not None
        assert kafka.process.pid != before.pid
        assert kafka.running
        assert kafka.ready_seconds is not None
        assert kafka.format_seconds is None  # the folder was kept, so it was not formatted again
        records = _consume(kafka.bootstrap_servers, "durable", "after-restart", expected=50)
        assert sorted(int(m.key()) for m in records) == list(range(50))
        assert all(m.value() == b"x" * int(m.key()) for m in records)


def test_the_summary_gives_the_brokers_format_and_ready_times_and_memory(kafka_server, pytestconfig):
    started = [line for line in pytestconfig.stash[_REPORT] if line.startswith("Kafka ") and "started at" in line]

    assert len(started) == 1
    assert re.search(r": ready in \d+\.\d s \(format \d+\.\d s\), resident memory \d+ MiB$", started[0]), started[0]
