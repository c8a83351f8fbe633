"""``kafka-dlq demo``: the handler working through a DLQ filled with every kind of dead letter, on the dev stack.

Transient failures that recover, a downstream outage that opens and then closes the circuit, poison, undecodable
records, records too old to retry, records no processor handles, and Spring Kafka dead letters: each leaves by
its door. A live view shows the counts; the run ends by itself with a table of outcomes.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections import Counter
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kafka_dlq.breaker import BreakerSettings
from kafka_dlq.classify import Classifier
from kafka_dlq.dev import DevStack, dev_up
from kafka_dlq.formats import encode_native
from kafka_dlq.handler import DLQHandler
from kafka_dlq.kafka import AsyncProducer
from kafka_dlq.kafka.admin import create_topics, delete_topics
from kafka_dlq.policy import RetryPolicy
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["run_demo"]

DAY_MS = 24 * 3600 * 1000


_Row = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes | None], ...]]


def _native(
    topic: str, key: str, value: bytes, *, first_failure: int | None = None, error: str = "TimeoutError"
) -> _Row:
    now = int(time.time() * 1000)
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(topic=topic, partition=0, offset=0, timestamp=now, key=key.encode(), value=value),
            failure=Failure(error_class=f"builtins.{error}", message="downstream timed out"),
            attempts=1,
            first_failure=first_failure or now,
            last_failure=now,
            group=f"{topic}-service",
        )
    )
    return encoded.key, encoded.value, encoded.headers


def _spring(topic: str, key: str, value: bytes) -> tuple[bytes, bytes, tuple[tuple[str, bytes | None], ...]]:
    # Spring Kafka's DeadLetterPublishingRecoverer: partition as a 4-byte and offset/timestamp as 8-byte big-endian.
    now = int(time.time() * 1000)
    return (
        key.encode(),
        value,
        (
            ("kafka_dlt-original-topic", topic.encode()),
            ("kafka_dlt-original-partition", struct.pack(">i", 0)),
            ("kafka_dlt-original-offset", struct.pack(">q", 42)),
            ("kafka_dlt-original-timestamp", struct.pack(">q", now)),
            ("kafka_dlt-exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
            ("kafka_dlt-exception-cause-fqcn", b"java.net.SocketTimeoutException"),
            ("kafka_dlt-exception-message", b"Read timed out"),
        ),
    )


class _Scenario:
    """The demo's downstreams: scripted failures, and an outage that ends after ``outage_seconds``."""

    def __init__(self, outage_seconds: float) -> None:
        self.calls: Counter[bytes] = Counter()
        self.outage_until = time.monotonic() + outage_seconds

    async def orders(self, dead_letter: DeadLetter) -> None:
        key = dead_letter.original.key or b""
        self.calls[key] += 1
        await asyncio.sleep(0.005)
        if key.startswith(b"poison"):
            raise ValueError("invalid order: missing customer id")
        if self.calls[key] <= int(key.rsplit(b"-", 1)[-1]) % 3:
            raise TimeoutError("orders service timed out")

    async def billing(self, dead_letter: DeadLetter) -> None:
        await asyncio.sleep(0.005)
        if time.monotonic() < self.outage_until:
            raise ConnectionError("billing service unavailable (503)")


def _records(run: str) -> list[tuple[str, tuple[Any, Any, Any]]]:
    old = int(time.time() * 1000) - 2 * DAY_MS
    out: list[tuple[str, tuple[Any, Any, Any]]] = []
    out += [("transient", _native("orders", f"order-{i}", b'{"order": %d}' % i)) for i in range(60)]
    out += [("outage", _native("billing", f"invoice-{i}", b'{"invoice": %d}' % i)) for i in range(40)]
    out += [("poison", _native("orders", f"poison-{i}", b'{"order": null}')) for i in range(10)]
    out += [("undecodable", (f"junk-{i}".encode(), b"\x00\x13not a dead letter", ())) for i in range(5)]
    out += [("too old", _native("orders", f"stale-{i}", b"{}", first_failure=old)) for i in range(5)]
    out += [("no processor", _native("inventory", f"sku-{i}", b"{}")) for i in range(5)]
    out += [("spring", _spring("orders", f"spring-{i}", b'{"order": "from java"}')) for i in range(5)]
    return out


def _live_table(handler: DLQHandler, total: int, started: float) -> Table:
    m = handler.get_metrics()
    table = Table(title=f"kafka-dlq handler {handler.name}: {time.monotonic() - started:4.1f} s")
    for column in ("consumed", "retried", "recovered", "parked", "deferred", "done", "circuits"):
        table.add_column(column, justify="right")
    circuits = ", ".join(f"{t}: {s}" for t, s in sorted(m["circuits"].items())) or "-"
    done = m["recovered"] + m["parked"]
    table.add_row(
        str(m["consumed"]),
        str(m["retried"]),
        str(m["recovered"]),
        str(m["parked"]),
        str(m["deferred"]),
        f"{done}/{total}",
        circuits,
    )
    return table


async def _demo(console: Console | None, bootstrap: str | None, redis_url: str | None) -> dict[str, Any]:
    if bootstrap and redis_url:
        stack = DevStack(
            kafka_pid=0,
            kafka_port=0,
            kafka_controller_port=0,
            kafka_version="?",
            redis_pid=0,
            redis_port=0,
            redis_version="?",
            folder="",
            bootstrap=bootstrap,
            redis=redis_url,
        )
    else:
        stack = await asyncio.to_thread(dev_up)
    run = uuid.uuid4().hex[:6]
    dlq = f"demo-{run}.dlq"
    poison = f"{dlq}.poison"
    await asyncio.to_thread(create_topics, stack.bootstrap_servers, {dlq: 3, poison: 1})
    if console:
        console.print(
            f"dev stack: Kafka {stack.kafka_version} at {stack.bootstrap_servers}, "
            f"Redis {stack.redis_version} at {stack.redis_url}"
        )
    records = _records(run)
    async with AsyncProducer({"bootstrap.servers": stack.bootstrap_servers}) as producer:
        futures = [await producer.send(dlq, value, key=key, headers=headers) for _, (key, value, headers) in records]
        await asyncio.gather(*futures)
    if console:
        kinds = Counter(kind for kind, _ in records)
        console.print(f"{len(records)} dead letters in {dlq}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))

    scenario = _Scenario(outage_seconds=4.0)
    handler = DLQHandler(
        name=f"demo-{run}",
        topics=[dlq],
        bootstrap_servers=stack.bootstrap_servers,
        redis_url=stack.redis_url,
        processors={"orders": scenario.orders, "billing": scenario.billing},
        policies=RetryPolicy(initial_delay=0.2, max_delay=1.0, max_attempts=20, max_age=24 * 3600),
        classifier=Classifier(non_retryable=[ValueError]),
        breaker=BreakerSettings(failure_threshold=5, open_seconds=1.5),
    )
    started = time.monotonic()
    total = len(records)
    try:
        async with handler:
            if console:
                with Live(_live_table(handler, total, started), console=console, refresh_per_second=8) as live:
                    while handler.get_metrics()["recovered"] + handler.get_metrics()["parked"] < total:
                        await asyncio.sleep(0.125)
                        live.update(_live_table(handler, total, started))
                        if time.monotonic() - started > 120:
                            break
            else:
                while handler.get_metrics()["recovered"] + handler.get_metrics()["parked"] < total:
                    await asyncio.sleep(0.1)
                    if time.monotonic() - started > 120:
                        break
            history = await handler.schedule.history("parked", limit=total)
            recovered = await handler.schedule.history("recovered", limit=total)
            await handler.schedule.clear()
        metrics = handler.get_metrics()
    finally:
        await asyncio.to_thread(delete_topics, stack.bootstrap_servers, [dlq, poison])
    outcomes: Counter[tuple[str, str]] = Counter()
    for item in recovered:
        outcomes[(item.get("topic", "?"), "recovered")] += 1
    for item in history:
        outcomes[(item.get("topic", "?"), f"parked: {item.get('reason')}")] += 1
    parked_on_intake = metrics["parked"] - len(history)
    if parked_on_intake:
        for reason, count in metrics["parked_by_reason"].items():
            already = sum(n for (_, door), n in outcomes.items() if door == f"parked: {reason}")
            if count > already:
                outcomes[("(on arrival)", f"parked: {reason}")] += count - already
    if console:
        table = Table(title=f"outcomes after {time.monotonic() - started:.1f} s")
        for column in ("original topic", "door", "records"):
            table.add_column(column)
        for (topic, door), count in sorted(outcomes.items()):
            table.add_row(topic, door, str(count))
        console.print(table)
        opened = handler.breaker("billing").times_opened
        console.print(
            f"{metrics['recovered']} recovered, {metrics['parked']} parked of {total}; "
            f"billing circuit opened {opened}x and closed again; loop lag {metrics['loop_lag_ms']} ms"
        )
        console.print("The dev stack keeps running: `kafka-dlq dev status`, and `kafka-dlq dev down` to stop it.")
    return {
        "dlq_topic": dlq,
        "records": total,
        "recovered": metrics["recovered"],
        "parked": metrics["parked"],
        "parked_by_reason": metrics["parked_by_reason"],
        "circuit_opened": handler.breaker("billing").times_opened,
        "seconds": round(time.monotonic() - started, 2),
        **stack.settings(),
    }


def run_demo(*, console: Console | None, bootstrap: str | None = None, redis_url: str | None = None) -> dict[str, Any]:
    """Run the demo to its end (on the dev stack, or on the servers given); returns the summary."""
    return asyncio.run(_demo(console, bootstrap, redis_url))
