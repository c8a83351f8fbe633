"""``kafka-dlq bench consumer``: the retrying consumer against a bare confluent-kafka consume loop.

Both read the same records (``--size`` bytes, three headers) from one topic and run the same no-op handler.

- ours: ``RetryingConsumer`` (concurrency, classification, done-watermark commits); the clock runs from the first
  record handled to the last one handled or dead-lettered.
- baseline: a plain synchronous loop: ``consume`` a batch, call the handler on each record, commit asynchronously.

Cases: ``ok`` (every record succeeds) and ``1pct-fail`` (1 record in 100 raises a non-retryable error: ours writes
its dead letter, with delivery, before the offset counts as done; the bare loop only counts the failure).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer

from kafka_dlq.bench import BenchOptions, BenchReport, BenchTopics, Case, LoopWatch, StallGuard, Stopwatch, Timing
from kafka_dlq.classify import Classifier
from kafka_dlq.kafka import AsyncProducer, KafkaRecord
from kafka_dlq.retrying import RetryingConsumer

__all__ = ["run"]

_HEADERS = (("trace-id", b"0af7651916cd43dd8448eb211c80319c"), ("source", b"bench"), ("schema", b"v1"))


class _Poison(Exception):
    """The 1 % that fail, not retryable."""


def _handler(fail: bool) -> Callable[[bytes | None], None]:
    def check(key: bytes | None) -> None:
        if fail and key is not None and key.endswith(b"00"):
            raise _Poison("bad record")

    return check


async def _seed(options: BenchOptions, topic: str) -> None:
    value = b"x" * options.size
    async with AsyncProducer({"bootstrap.servers": options.bootstrap_servers}) as producer:
        futures = [await producer.send(topic, value, key=b"%08d" % i, headers=_HEADERS) for i in range(options.records)]
        await asyncio.gather(*futures)


async def _ours(options: BenchOptions, topic: str, dlq: str, fail: bool, watch: LoopWatch) -> Timing:
    check = _handler(fail)
    clock = Stopwatch()

    async def handle(record: KafkaRecord) -> None:
        clock.start()
        check(record.key)

    consumer = RetryingConsumer(
        handle,
        topics=[topic],
        group_id=f"kafka-dlq-bench-consumer-{uuid.uuid4().hex[:8]}",
        bootstrap_servers=options.bootstrap_servers,
        dlq_topic=dlq,
        classifier=Classifier(non_retryable=[_Poison]),
        concurrency=256,
    )
    guard = StallGuard("bench consumer (ours)", options.records)
    async with watch, consumer:
        while True:
            metrics = consumer.get_metrics()
            finished = metrics["processed"] + metrics["dead_lettered"]
            if finished >= options.records:
                break
            guard.check(finished)
            await asyncio.sleep(0.005)
        return clock.stop(options.records)


def _baseline(options: BenchOptions, topic: str, fail: bool) -> Timing:
    check = _handler(fail)
    consumer = Consumer(
        {
            "bootstrap.servers": options.bootstrap_servers,
            "group.id": f"kafka-dlq-bench-consumer-bare-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    clock, guard = Stopwatch(), StallGuard("bench consumer (baseline)", options.records)
    seen = failed = 0
    try:
        while seen < options.records:
            messages = consumer.consume(500, 1.0)
            guard.check(seen)
            for msg in messages:
                if msg.error() is not None:
                    continue
                clock.start()
                try:
                    check(msg.key())
                except _Poison:
                    failed += 1
                seen += 1
            if messages:
                consumer.commit(asynchronous=True)
        return clock.stop(options.records)
    finally:
        consumer.close()


def run(options: BenchOptions) -> BenchReport:
    cases: list[Case] = []
    watches: list[LoopWatch] = []
    for name, fail in (("ok", False), ("1pct-fail", True)):
        roles = [name, f"{name}-dlq"]
        with BenchTopics(options.bootstrap_servers, "consumer", roles, partitions=options.partitions) as topics:
            options.progress(f"{name}: seeding {options.records} records")
            asyncio.run(_seed(options, topics[name]))
            options.progress(f"{name}: baseline")
            baseline = _baseline(options, topics[name], fail)
            options.progress(f"{name}: ours")
            watch = LoopWatch()
            ours = asyncio.run(_ours(options, topics[name], topics[f"{name}-dlq"], fail, watch))
            watches.append(watch)
        cases.append(Case(name=name, ours=ours, baseline=baseline))
    return BenchReport(
        name="consumer",
        records=options.records,
        size=options.size,
        cases=cases,
        headline="ok",
        baseline="a bare synchronous confluent-kafka loop: consume a batch, call the same handler on each record, "
        "commit asynchronously",
        loop=LoopWatch.merged(watches),
    )
