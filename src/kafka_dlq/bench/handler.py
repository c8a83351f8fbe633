"""``kafka-dlq bench handler``: the DLQ handler pipeline against the pattern it replaces.

Both sides read the same dead letters (1 KB values by default, native headers) from one DLQ topic.

- ours: ``DLQHandler`` consumes, schedules in Redis, claims, calls a no-op processor and records the recovery;
  the clock runs from the first record consumed to the last recovered.
- baseline: written plainly here, the seed system's pattern: poll one record, call the processor, write the retry
  state to Redis, commit synchronously, one record at a time.

Two cases: ``recover`` (the processor succeeds) and ``fail-once`` (the first call of each record fails, then it
recovers: ours through the schedule with a 10 ms backoff, the baseline retrying in place).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import redis
from confluent_kafka import Consumer

from kafka_dlq.bench import BenchOptions, BenchReport, BenchTopics, Case, LoopWatch, StallGuard, Stopwatch, Timing
from kafka_dlq.breaker import BreakerSettings
from kafka_dlq.errors import ConfigError
from kafka_dlq.formats import encode_native
from kafka_dlq.handler import DLQHandler
from kafka_dlq.kafka import AsyncProducer
from kafka_dlq.policy import Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["run"]


async def _seed(options: BenchOptions, topic: str) -> None:
    now = int(time.time() * 1000)
    value = b"x" * options.size
    async with AsyncProducer({"bootstrap.servers": options.bootstrap_servers}) as producer:
        futures = []
        for i in range(options.records):
            encoded = encode_native(
                DeadLetter(
                    original=OriginalRecord(
                        topic="orders", partition=0, offset=i, timestamp=now, key=b"%d" % i, value=value
                    ),
                    failure=Failure(error_class="builtins.TimeoutError", message="downstream timed out"),
                    attempts=1,
                    first_failure=now,
                    last_failure=now,
                )
            )
            futures.append(await producer.send(topic, encoded.value, key=encoded.key, headers=encoded.headers))
        await asyncio.gather(*futures)


class _FailOnce:
    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, key: bytes) -> None:
        if key not in self.seen:
            self.seen.add(key)
            raise ConnectionError("first call fails")


async def _ours(options: BenchOptions, topic: str, fail_once: bool, watch: LoopWatch) -> Timing:
    failing = _FailOnce()

    async def processor(dead_letter: DeadLetter) -> None:
        if fail_once:
            failing(dead_letter.original.key or b"")

    handler = DLQHandler(
        name=f"bench-{uuid.uuid4().hex[:8]}",
        topics=[topic],
        poison_topic=topic,  # nothing is parked here; the handler only checks the topic exists
        bootstrap_servers=options.bootstrap_servers,
        redis_url=str(options.redis_url),
        processors={"orders": processor},
        policies=RetryPolicy(initial_delay=0.01, max_delay=0.01, jitter=Jitter.NONE, max_attempts=10),
        # Every first call failing looks like an outage to a circuit breaker, which would then (rightly) slow the
        # retries down: this measures the pipeline, so the breaker is off.
        breaker=BreakerSettings(failure_threshold=0),
    )
    clock, guard = Stopwatch(), StallGuard("bench handler (ours)", options.records)
    async with watch, handler:
        while True:
            metrics = handler.get_metrics()
            if metrics["consumed"]:
                clock.start()
            if metrics["recovered"] >= options.records:
                break
            guard.check(metrics["recovered"])
            await asyncio.sleep(0.01)
        timing = clock.stop(options.records)
        await handler.schedule.clear()
    return timing


def _baseline(options: BenchOptions, topic: str, fail_once: bool) -> Timing:
    """The pattern this project replaces, plainly: one record at a time, state to Redis, synchronous commit."""
    failing = _FailOnce()
    store = redis.Redis.from_url(str(options.redis_url))
    key = f"kafka-dlq-bench-baseline:{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": options.bootstrap_servers,
            "group.id": f"kafka-dlq-bench-baseline-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    clock, guard = Stopwatch(), StallGuard("bench handler (baseline)", options.records)
    done = 0
    try:
        while done < options.records:
            msg = consumer.poll(1.0)
            guard.check(done)
            if msg is None or msg.error() is not None:
                continue
            clock.start()
            record_key = msg.key() or b""
            while True:
                try:
                    if fail_once:
                        failing(record_key)
                    break
                except ConnectionError as exc:
                    state = {"topic": msg.topic(), "offset": msg.offset(), "error": str(exc), "retry_count": 1}
                    store.hset(key, record_key, json.dumps(state))
            store.hdel(key, record_key)
            consumer.commit(message=msg, asynchronous=False)
            done += 1
        return clock.stop(options.records)
    finally:
        consumer.close()
        store.delete(key)
        store.close()


def run(options: BenchOptions) -> BenchReport:
    if not options.redis_url:
        raise ConfigError("bench handler needs Redis: give --redis-url (or KAFKA_DLQ_REDIS_URL), or use the dev stack")
    cases: list[Case] = []
    watches: list[LoopWatch] = []
    extra: dict[str, Any] = {}
    for name, fail_once in (("recover", False), ("fail-once", True)):
        with BenchTopics(options.bootstrap_servers, "handler", [name], partitions=options.partitions) as topics:
            options.progress(f"{name}: seeding {options.records} dead letters")
            asyncio.run(_seed(options, topics[name]))
            options.progress(f"{name}: ours")
            watch = LoopWatch()
            ours = asyncio.run(_ours(options, topics[name], fail_once, watch))
            watches.append(watch)
            extra[f"loop_lag_ms_{name}"] = watch.lag_summary()
            options.progress(f"{name}: baseline")
            baseline = _baseline(options, topics[name], fail_once)
        cases.append(Case(name=name, ours=ours, baseline=baseline))
    return BenchReport(
        name="handler",
        records=options.records,
        size=options.size,
        cases=cases,
        headline="recover",
        baseline="a plain loop: poll one record, call the processor, write the retry state to Redis, commit "
        "synchronously, one at a time (the pattern kafka-dlq replaces)",
        loop=LoopWatch.merged(watches),
        extra=extra,
    )
