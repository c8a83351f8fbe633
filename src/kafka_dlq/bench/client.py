"""``kafka-dlq bench client``: the async client layer against a bare, synchronous confluent-kafka loop.

Three cases, each run through ``AsyncProducer`` / ``AsyncConsumer`` ("ours") and through a plain confluent-kafka
loop with no asyncio ("bare"), in the same process, on the same records (``--size`` byte values, three headers),
with the same partition counts and client settings:

- ``produce``: send every record, until every delivery is acknowledged (idempotent, ``acks=all``);
- ``consume``: read every record (key, value and headers) through a consumer group, then commit;
- ``copy``: consume one topic and produce each record to another, until all are delivered and the offsets commit.

``ratio`` is the copy case, ours over bare; ``loop_lag_ms`` is sampled while ours runs. A few records warm the
broker up first, and the two sides take turns at going first, case by case.

>>> from kafka_dlq.bench import BenchOptions, run_bench
>>> report = run_bench("client", BenchOptions(bootstrap_servers="127.0.0.1:19092"))  # doctest: +SKIP
>>> report.to_json()["cases"]["copy"]["ratio"]  # doctest: +SKIP
0.92
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from kafka_dlq.bench import (
    BenchOptions,
    BenchReport,
    BenchTopics,
    Case,
    LoopWatch,
    StallGuard,
    Stopwatch,
    Timing,
    client_settings,
    round_ratio,
    unique_name,
)
from kafka_dlq.errors import KafkaDLQError
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, Delivery, Headers, KafkaRecord

__all__ = ["run"]

NAME = "client"
BASELINE = "bare confluent-kafka loop, synchronous (produce + poll(0) + flush; consume(batch) loop)"
BATCH = 500
"""Records per consume call, for both sides."""
CONSUME_TIMEOUT = 0.05
"""Seconds one consume call may wait, for both sides (AsyncConsumer's own default)."""
MAX_IN_FLIGHT = 3
"""Batches the copy through ours may have sent and not yet seen acknowledged (librdkafka's queue bounds bare).

Three (1,500 records) copy as fast as twenty: acknowledgements come back within a few milliseconds. A wider window
only lets more deliveries pile up behind a broker pause, and their reports are then served on the loop all at once
(A/B, 200k records, 4 runs each: loop-lag p99 9.0 ms with 3, 23.8 ms with 20, at the same rate)."""
DELIVERY_TIMEOUT = 120.0
"""How long the last deliveries of a case may take before the run is declared broken."""
HEADERS: Headers = (
    ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("source", b"kafka-dlq-bench"),
    ("content-type", b"application/octet-stream"),
)


@dataclass(frozen=True)
class Workload:
    """The records every case sends: distinct keys, one value of ``size`` random bytes, three headers."""

    keys: list[bytes]
    value: bytes
    headers: Headers

    def listed_headers(self) -> list[tuple[str, str | bytes | None]]:
        """The headers as confluent-kafka takes them (a list), made once per case for the bare loop."""
        return list(self.headers)

    @classmethod
    def make(cls, records: int, size: int) -> Workload:
        return cls([b"key-%08d" % i for i in range(records)], os.urandom(size), HEADERS)

    @property
    def total_bytes(self) -> int:
        return len(self.keys) * len(self.value)


@dataclass(frozen=True)
class Settings:
    """The client settings both sides run with: spelled out (AsyncProducer's defaults too), then the user's."""

    base: dict[str, Any]

    def producer(self) -> dict[str, Any]:
        return {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 262_144,
            "batch.num.messages": 1000,
            "queue.buffering.max.messages": 1000,
            **self.base,
        }

    def consumer(self, role: str) -> dict[str, Any]:
        group = unique_name(NAME, role)
        return {
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            "fetch.queue.backoff.ms": 10,
            **self.base,
        }


def run(options: BenchOptions) -> BenchReport:
    """Run the three cases, both sides each, ``options.rounds`` times, and report the median round of each case.

    Blocking (ours runs in its own event loop per case). A case of 100,000 records takes about a second, so one
    broker hiccup (a log roll, its garbage collector) moves a single round's figure a lot; the round with the median
    ratio is reported, with every round's ratio beside it, and the loop lag is over every round of ours.
    """
    data = Workload.make(options.records, options.size)
    settings = Settings(client_settings(options))
    with BenchTopics(options.bootstrap_servers, NAME, ["warm-up"], partitions=options.partitions) as topics:
        # A broker that has just started is slow for its first records (its JIT, the producer id, the group
        # coordinator loading): a few records first, so that whichever case comes first does not pay for that.
        options.progress("warm-up")
        bare_produce(settings, topics["warm-up"], Workload.make(min(options.records, 2000), options.size))
    rounds = [_round(options, settings, data, number) for number in range(1, options.rounds + 1)]
    cases = [_median([round_[name][0] for round_ in rounds]) for name in ("produce", "consume", "copy")]
    watches = {name: LoopWatch.merged([round_[name][1] for round_ in rounds]) for name in rounds[0]}
    return BenchReport(
        name=NAME,
        records=options.records,
        size=options.size,
        cases=cases,
        headline="copy",
        baseline=BASELINE,
        loop=LoopWatch.merged(list(watches.values())),
        extra={
            "headers": len(HEADERS),
            "partitions": options.partitions,
            "bootstrap_servers": options.bootstrap_servers,
            "client_config": dict(options.client_config),
            "rounds": options.rounds,
            "ratio_by_round": {name: [round_ratio(round_[name][0].ratio) for round_ in rounds] for name in rounds[0]},
            "loop_lag_ms_by_case": {case: watch.lag_summary() for case, watch in watches.items()},
        },
    )


def _median(cases: list[Case]) -> Case:
    """The case whose ratio is the median of the rounds' (the lower middle one of an even count)."""
    ordered = sorted(cases, key=lambda case: case.ratio or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def _round(options: BenchOptions, settings: Settings, data: Workload, number: int) -> dict[str, tuple[Case, LoopWatch]]:
    """One round: each case through ours and through bare, on topics of its own."""
    out: dict[str, tuple[Case, LoopWatch]] = {}
    roles = ["bare", "ours", "bare-copy", "ours-copy"]
    step = f"round {number} of {options.rounds}, " if options.rounds > 1 else ""
    with BenchTopics(options.bootstrap_servers, NAME, roles, partitions=options.partitions) as topics:

        def case(
            name: str,
            bare_first: bool,
            bare: Callable[[], Timing],
            ours: Callable[[LoopWatch], Coroutine[Any, Any, Timing]],
        ) -> None:
            watch = LoopWatch()
            timings: dict[str, Timing] = {}
            for side in ("bare", "ours") if bare_first else ("ours", "bare"):
                options.progress(f"{step}{name}: {side}")
                timings[side] = bare() if side == "bare" else asyncio.run(ours(watch))
            out[name] = (Case(name=name, ours=timings["ours"], baseline=timings["bare"]), watch)

        # Each side consumes and copies the topic it produced itself: the same records, laid out the same way.
        # The order alternates from case to case and from round to round, so that neither side always meets the
        # broker first, or always just after the other side's records.
        odd = number % 2 == 1
        case(
            "produce",
            odd,
            lambda: bare_produce(settings, topics["bare"], data),
            lambda watch: ours_produce(settings, topics["ours"], data, watch),
        )
        case(
            "consume",
            not odd,
            lambda: bare_consume(settings, topics["bare"], data),
            lambda watch: ours_consume(settings, topics["ours"], data, watch),
        )
        case(
            "copy",
            odd,
            lambda: bare_copy(settings, topics["bare"], topics["bare-copy"], data),
            lambda watch: ours_copy(settings, topics["ours"], topics["ours-copy"], data, watch),
        )
    return out


def _check(what: str, got: int, nbytes: int, data: Workload) -> None:
    if got != len(data.keys) or nbytes != data.total_bytes:
        raise KafkaDLQError(
            f"{what}: expected {len(data.keys)} records of {len(data.value)} bytes, got {got} ({nbytes} bytes)"
        )


# ---------------------------------------------------------------- ours: the async client layer


async def ours_produce(settings: Settings, topic: str, data: Workload, watch: LoopWatch) -> Timing:
    async with watch, AsyncProducer(settings.producer(), name="bench-producer") as producer:
        clock = Stopwatch()
        clock.start()
        value, headers = data.value, data.headers
        # Like the bare loop: send everything, then flush; each record's outcome is looked at once it is known
        # (holding every future to the end would only give the garbage collector a heap to walk, again and again).
        pending: deque[asyncio.Future[Delivery]] = deque()
        delivered = 0
        for key in data.keys:
            pending.append(await producer.send(topic, value, key=key, headers=headers))
            if len(pending) >= BATCH:
                delivered += _take_delivered(pending, "produce (ours)")
        remaining = await producer.flush(DELIVERY_TIMEOUT)
        delivered += _take_delivered(pending, "produce (ours)")
        timing = clock.stop(delivered)
    if remaining or pending:
        raise KafkaDLQError(f"produce (ours): {len(pending)} records not delivered in {DELIVERY_TIMEOUT:.0f} s")
    _check("produce (ours)", delivered, delivered * len(value), data)
    return timing


def _take_delivered(pending: deque[asyncio.Future[Delivery]], what: str) -> int:
    """Drop the oldest futures that are resolved, raising the first failure; how many were dropped."""
    count = 0
    while pending and pending[0].done():
        error = pending.popleft().exception()
        if error is not None:
            raise KafkaDLQError(f"{what}: {error}")
        count += 1
    return count


async def ours_consume(settings: Settings, topic: str, data: Workload, watch: LoopWatch) -> Timing:
    consumer = AsyncConsumer(settings.consumer("consume-ours"), [topic], batch_size=BATCH, poll_timeout=CONSUME_TIMEOUT)
    async with watch, consumer:
        clock, guard = Stopwatch(), StallGuard("consume (ours)", len(data.keys))
        got = nbytes = 0
        while got < len(data.keys):
            batch = await consumer.getmany(max_records=BATCH, timeout=1.0)
            if batch:
                clock.start()
            for record in batch:
                nbytes += len(record.value or b"")
            consumer.done_many(batch)
            got += len(batch)
            guard.check(got)
        await consumer.commit()
        timing = clock.stop(got)
    _check("consume (ours)", got, nbytes, data)
    return timing


async def ours_copy(settings: Settings, source: str, target: str, data: Workload, watch: LoopWatch) -> Timing:
    consumer = AsyncConsumer(settings.consumer("copy-ours"), [source], batch_size=BATCH, poll_timeout=CONSUME_TIMEOUT)
    producer = AsyncProducer(settings.producer(), name="bench-copy-producer")
    async with watch, consumer, producer:
        clock, guard = Stopwatch(), StallGuard("copy (ours)", len(data.keys))
        copied = 0
        in_flight: deque[tuple[list[KafkaRecord], list[asyncio.Future[Delivery]]]] = deque()
        while copied < len(data.keys):
            batch = await consumer.getmany(max_records=BATCH, timeout=1.0)
            if batch:
                clock.start()
                futures = [await producer.send(target, r.value, key=r.key, headers=r.headers) for r in batch]
                in_flight.append((batch, futures))
                copied += len(batch)
            # A batch's offsets may commit once its copies are acknowledged: at least once, without waiting here.
            _mark_delivered(consumer, in_flight)
            if len(in_flight) > MAX_IN_FLIGHT:
                # A bounded pipeline, as any at-least-once copier keeps: wait for the oldest batch's copies.
                await asyncio.wait(in_flight[0][1])
                _mark_delivered(consumer, in_flight)
            guard.check(copied)
        remaining = await producer.flush(DELIVERY_TIMEOUT)
        _mark_delivered(consumer, in_flight)
        if remaining or in_flight:
            raise KafkaDLQError(f"copy (ours): {remaining} records not delivered in {DELIVERY_TIMEOUT:.0f} s")
        await consumer.commit()
        timing = clock.stop(copied)
    _check("copy (ours)", copied, copied * len(data.value), data)
    return timing


def _mark_delivered(
    consumer: AsyncConsumer, in_flight: deque[tuple[list[KafkaRecord], list[asyncio.Future[Delivery]]]]
) -> None:
    """Mark done the oldest batches whose copies are all acknowledged; raise the first failed delivery."""
    while in_flight and all(future.done() for future in in_flight[0][1]):
        batch, futures = in_flight.popleft()
        for future in futures:
            if future.exception() is not None:
                raise KafkaDLQError(f"copy (ours): {future.exception()}")
        consumer.done_many(batch)


# ---------------------------------------------------------------- bare: confluent-kafka, written plainly


class _Deliveries:
    """The bare loop's delivery callback: counts acknowledgements, keeps the first error."""

    def __init__(self) -> None:
        self.acked = 0
        self.error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, msg: Message) -> None:
        if error is None:
            self.acked += 1
        elif self.error is None:
            self.error = error

    def check(self, what: str, remaining: int) -> None:
        if self.error is not None or remaining:
            raise KafkaDLQError(f"{what}: {remaining} records not delivered ({self.error})")


def _bare_producer(settings: Settings, topic: str) -> Producer:
    producer = Producer(settings.producer())
    producer.list_topics(topic, timeout=15)  # connected before the clock starts, as AsyncProducer.start() does
    return producer


def _commit_last(consumer: Consumer) -> None:
    """The bare loops' last commit: "no offset stored" only means the periodic commit already took everything."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not (isinstance(error, KafkaError) and error.code() == KafkaError._NO_OFFSET):
            raise


def bare_produce(settings: Settings, topic: str, data: Workload) -> Timing:
    producer = _bare_producer(settings, topic)
    deliveries = _Deliveries()
    clock = Stopwatch()
    clock.start()
    value, headers = data.value, data.listed_headers()
    for key in data.keys:
        while True:
            try:
                producer.produce(topic, value, key=key, headers=headers, on_delivery=deliveries)
                break
            except BufferError:  # the local queue is full: serve delivery reports to make room
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(DELIVERY_TIMEOUT)
    timing = clock.stop(deliveries.acked)
    deliveries.check("produce (bare)", remaining)
    _check("produce (bare)", deliveries.acked, deliveries.acked * len(value), data)
    return timing


def bare_consume(settings: Settings, topic: str, data: Workload) -> Timing:
    consumer = Consumer(settings.consumer("consume-bare"))
    consumer.subscribe([topic])
    clock, guard = Stopwatch(), StallGuard("consume (bare)", len(data.keys))
    got = nbytes = 0
    last_commit = time.monotonic()
    try:
        while got < len(data.keys):
            messages = consumer.consume(BATCH, CONSUME_TIMEOUT)
            if messages:
                clock.start()
            for msg in messages:
                if msg.error() is not None:
                    raise KafkaDLQError(f"consume (bare): {msg.error()}")
                # What a handler gets from either side: key, value and headers.
                _key, value, _headers = msg.key(), msg.value(), msg.headers()
                nbytes += len(value or b"")
                got += 1
            if time.monotonic() - last_commit >= 1.0:  # the same interval AsyncConsumer commits at
                consumer.commit(asynchronous=True)
                last_commit = time.monotonic()
            guard.check(got)
        _commit_last(consumer)
        timing = clock.stop(got)
    finally:
        consumer.close()
    _check("consume (bare)", got, nbytes, data)
    return timing


def bare_copy(settings: Settings, source: str, target: str, data: Workload) -> Timing:
    producer = _bare_producer(settings, target)
    consumer = Consumer(settings.consumer("copy-bare"))
    consumer.subscribe([source])
    deliveries = _Deliveries()
    clock, guard = Stopwatch(), StallGuard("copy (bare)", len(data.keys))
    copied = 0
    last_commit = time.monotonic()
    try:
        while copied < len(data.keys):
            messages = consumer.consume(BATCH, CONSUME_TIMEOUT)
            if messages:
                clock.start()
            for msg in messages:
                if msg.error() is not None:
                    raise KafkaDLQError(f"copy (bare): {msg.error()}")
                while True:
                    try:
                        producer.produce(
                            target, msg.value(), key=msg.key(), headers=msg.headers(), on_delivery=deliveries
                        )
                        break
                    except BufferError:
                        producer.poll(0.1)
                copied += 1
            producer.poll(0)
            if time.monotonic() - last_commit >= 1.0:
                consumer.commit(asynchronous=True)
                last_commit = time.monotonic()
            guard.check(copied)
        remaining = producer.flush(DELIVERY_TIMEOUT)
        _commit_last(consumer)
        timing = clock.stop(copied)
    finally:
        consumer.close()
    deliveries.check("copy (bare)", remaining)
    _check("copy (bare)", deliveries.acked, deliveries.acked * len(data.value), data)
    return timing
