"""Foreign dead letters, end to end: each format, written to a DLQ topic byte for byte as its system writes it, is
recovered by the DLQ handler, whose processor sees the original record and the failure history carried over.

The encodings are those of tests/test_formats_spring.py and tests/test_formats_apache.py (read from Spring Kafka's
and Apache Kafka's source): Spring's partition is ``ByteBuffer.putInt`` and its offset and timestamp ``putLong``
(big-endian binary), ``retry_topic-attempts`` is ``putInt(attempts + 1)`` and ``retry_topic-*-timestamp`` is
``BigInteger.toByteArray()``; Connect, Streams and share groups write UTF-8 text, numbers in decimal.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kafka_dlq.formats import SourceFormat
from kafka_dlq.handler import DLQHandler
from kafka_dlq.kafka import AsyncProducer
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.kafka.record import Headers
from kafka_dlq.policy import Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, OriginalRecord
from tests.conftest import wait_for

# Recent times: a record older than the topic's retention could be cleaned away under the test.
WRITTEN = (int(time.time()) - 60) * 1000
"""When the foreign system wrote the dead letter: the DLQ record's timestamp."""
PRODUCED = WRITTEN - 3_600_000
"""When the original record was produced."""
FIRST_FAILED = WRITTEN - 1_800_000
STACK = "java.lang.IllegalStateException: total must be positive\n\tat com.acme.Orders.handle(Orders.java:42)"


def big_integer(number: int) -> bytes:
    """Java's BigInteger.toByteArray(): minimal big-endian two's complement."""
    return number.to_bytes((number.bit_length() + 8) // 8, "big", signed=True)


@dataclass(frozen=True)
class Case:
    """A dead letter as a foreign system writes it, and what the processor must see."""

    key: bytes | None
    value: bytes
    headers: Headers
    original: OriginalRecord
    error_class: str | None
    attempts: int
    first_failure: int
    last_failure: int
    source_format: SourceFormat


CASES: dict[str, Case] = {
    "spring-dlt": Case(
        key=b"order-1",
        value=b'{"total":-12}',
        headers=(
            ("traceparent", b"00-abc-01"),
            ("kafka_dlt-exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
            ("kafka_dlt-exception-cause-fqcn", b"java.lang.IllegalStateException"),
            ("kafka_dlt-exception-message", b"Listener failed; total must be positive"),
            ("kafka_dlt-exception-stacktrace", STACK.encode()),
            ("kafka_dlt-original-topic", b"orders"),
            ("kafka_dlt-original-partition", struct.pack(">i", 3)),
            ("kafka_dlt-original-offset", struct.pack(">q", 4711)),
            ("kafka_dlt-original-timestamp", struct.pack(">q", PRODUCED)),
            ("kafka_dlt-original-timestamp-type", b"CreateTime"),
            ("kafka_dlt-original-consumer-group", b"billing"),
        ),
        original=OriginalRecord(
            topic="orders",
            partition=3,
            offset=4711,
            timestamp=PRODUCED,
            key=b"order-1",
            value=b'{"total":-12}',
            headers=(("traceparent", b"00-abc-01"),),
        ),
        error_class="java.lang.IllegalStateException",
        attempts=1,
        # Spring carries no failure times: the DLT record's timestamp is the last (and only known) failure.
        first_failure=WRITTEN,
        last_failure=WRITTEN,
        source_format=SourceFormat.SPRING,
    ),
    "spring-retry-topic": Case(
        key=b"order-2",
        value=b'{"total":-3}',
        headers=(
            ("traceparent", b"00-def-01"),
            ("kafka_original-topic", b"orders"),
            ("kafka_original-partition", struct.pack(">i", 1)),
            ("kafka_original-offset", struct.pack(">q", 99)),
            ("kafka_original-timestamp", struct.pack(">q", PRODUCED)),
            ("kafka_original-timestamp-type", b"CreateTime"),
            ("kafka_original-consumer-group", b"billing"),
            ("retry_topic-original-timestamp", big_integer(PRODUCED)),
            ("retry_topic-attempts", struct.pack(">i", 2)),
            ("retry_topic-backoff-timestamp", big_integer(PRODUCED + 1000)),
            ("kafka_exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
            ("kafka_exception-cause-fqcn", b"java.lang.IllegalStateException"),
            ("kafka_exception-message", b"Listener failed; boom"),
            ("kafka_exception-stacktrace", STACK.encode()),
            ("retry_topic-original-timestamp", big_integer(PRODUCED)),
            ("retry_topic-attempts", struct.pack(">i", 4)),
            ("retry_topic-backoff-timestamp", big_integer(PRODUCED + 6000)),
        ),
        original=OriginalRecord(
            topic="orders",
            partition=1,
            offset=99,
            timestamp=PRODUCED,
            key=b"order-2",
            value=b'{"total":-3}',
            headers=(("traceparent", b"00-def-01"),),
        ),
        error_class="java.lang.IllegalStateException",
        attempts=3,  # the last hop wrote putInt(attempts + 1) = 4 after the third delivery failed
        first_failure=WRITTEN,
        last_failure=WRITTEN,
        source_format=SourceFormat.SPRING_RETRY,
    ),
    "kafka-connect": Case(
        key=b"k1",
        value=b"\x00\x00\x00\x00\x07avro",
        headers=(
            ("schema-id", b"\x00\x00\x00\x07"),
            ("__connect.errors.topic", b"orders"),
            ("__connect.errors.partition", b"4"),
            ("__connect.errors.offset", b"1500"),
            ("__connect.errors.connector.name", b"orders-jdbc-sink"),
            ("__connect.errors.task.id", b"2"),
            ("__connect.errors.stage", b"VALUE_CONVERTER"),
            ("__connect.errors.class.name", b"io.confluent.connect.avro.AvroConverter"),
            ("__connect.errors.exception.class.name", b"org.apache.kafka.connect.errors.DataException"),
            ("__connect.errors.exception.message", b"Converting byte[] to Kafka Connect data failed"),
            ("__connect.errors.exception.stacktrace", b"org.apache.kafka.connect.errors.DataException: ...\n\tat ..."),
        ),
        original=OriginalRecord(
            topic="orders",
            partition=4,
            offset=1500,
            timestamp=WRITTEN,  # the reporter copies the original's timestamp onto the DLQ record
            key=b"k1",
            value=b"\x00\x00\x00\x00\x07avro",
            headers=(("schema-id", b"\x00\x00\x00\x07"),),
        ),
        error_class="org.apache.kafka.connect.errors.DataException",
        attempts=1,
        first_failure=WRITTEN,
        last_failure=WRITTEN,
        source_format=SourceFormat.CONNECT,
    ),
    "kafka-streams": Case(
        key=b"user-9",
        value=b"\x00\x00\x00",
        headers=(
            ("tenant", b"acme"),
            ("__streams.errors.exception", b"org.apache.kafka.common.errors.SerializationException"),
            ("__streams.errors.message", b"Size of data received by IntegerDeserializer is not 4"),
            ("__streams.errors.stacktrace", b"org.apache.kafka.common.errors.SerializationException: Size...\n\tat"),
            ("__streams.errors.topic", b"clicks"),
            ("__streams.errors.partition", b"7"),
            ("__streams.errors.offset", b"31337"),
        ),
        original=OriginalRecord(
            topic="clicks",
            partition=7,
            offset=31337,
            timestamp=WRITTEN,
            key=b"user-9",
            value=b"\x00\x00\x00",
            headers=(("tenant", b"acme"),),
        ),
        error_class="org.apache.kafka.common.errors.SerializationException",
        attempts=1,
        first_failure=WRITTEN,
        last_failure=WRITTEN,
        source_format=SourceFormat.STREAMS,
    ),
    "share-group": Case(
        key=b"pay-41",
        value=b'{"amount":10}',
        headers=(
            ("__dlq.errors.topic", b"payments"),
            ("__dlq.errors.partition", b"2"),
            ("__dlq.errors.offset", b"41"),
            ("__dlq.errors.group", b"payment-workers"),
            ("__dlq.errors.delivery.count", b"5"),
            ("__dlq.errors.message", b"Offset delivery count exceeded the threshold."),
        ),
        original=OriginalRecord(
            topic="payments",
            partition=2,
            offset=41,
            timestamp=None,  # the broker stamps the dead letter with its own time: the original's is unknown
            key=b"pay-41",
            value=b'{"amount":10}',
            headers=(),  # share groups never copy headers
        ),
        error_class=None,
        attempts=5,  # every delivery of a record that ends here failed
        first_failure=WRITTEN,
        last_failure=WRITTEN,
        source_format=SourceFormat.SHARE_GROUP,
    ),
    "seed-json-handler": Case(
        key=None,
        value=json.dumps(
            {
                "original_topic": "orders",
                "original_value": '{"id": 7, "total": 12}',
                "error": "ValueError: total must be positive",
                "retry_count": 2,
                "first_failure_time": FIRST_FAILED / 1000,  # the seed wrote epoch seconds
                "partition": 3,
                "offset": 1234,
                "key": "order-7",
            }
        ).encode(),
        headers=(("content-type", b"application/json"),),
        original=OriginalRecord(
            topic="orders",
            partition=3,
            offset=1234,
            key=b"order-7",
            value=b'{"id": 7, "total": 12}',
            headers=(("content-type", b"application/json"),),
        ),
        error_class="ValueError",
        attempts=3,  # the first failure and two failed retries
        first_failure=FIRST_FAILED,
        last_failure=WRITTEN,
        source_format=SourceFormat.SEED_JSON,
    ),
    "seed-json-publisher": Case(
        key=None,
        value=json.dumps(
            {
                "original_topic": "orders",
                "original_value": {"id": 8, "note": "déjà vu"},
                "error": "connection reset by peer",
                "attempt_count": 4,
                "original_partition": 0,
                "original_offset": 55,
                "original_timestamp": PRODUCED,
                "original_key": "order-8",
            },
            ensure_ascii=False,
        ).encode(),
        headers=(),
        original=OriginalRecord(
            topic="orders",
            partition=0,
            offset=55,
            timestamp=PRODUCED,
            key=b"order-8",
            value='{"id":8,"note":"déjà vu"}'.encode(),
            headers=(),
        ),
        error_class=None,
        attempts=4,
        first_failure=PRODUCED,  # the publisher kept no failure time: the original record's time stands in
        last_failure=WRITTEN,
        source_format=SourceFormat.SEED_JSON,
    ),
}


@pytest.fixture
def dlq_topic(new_topic: Callable[..., str], kafka_bootstrap: str) -> Callable[[], str]:
    """A DLQ topic and the poison topic the handler needs beside it."""

    def make() -> str:
        name = new_topic(1, None, "formats.dlq")
        create_topics(kafka_bootstrap, {f"{name}.poison": 1})
        return name

    return make


@pytest.mark.parametrize("name", list(CASES))
async def test_a_foreign_dead_letter_is_recovered_with_its_original_record_and_history(
    name, kafka_bootstrap, redis_url, unique_name, dlq_topic
):
    case = CASES[name]
    topic = await asyncio.to_thread(dlq_topic)
    async with AsyncProducer({"bootstrap.servers": kafka_bootstrap}) as producer:
        await producer.produce(topic, case.value, key=case.key, headers=case.headers, timestamp=WRITTEN)
    seen: list[DeadLetter] = []

    async def recover(dead_letter: DeadLetter) -> None:
        seen.append(dead_letter)
        if len(seen) == 1:
            raise ConnectionError("downstream said 503")  # once: the next attempt shows the history carried on

    handler = DLQHandler(
        name=unique_name("formats"),
        topics=[topic],
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        default_processor=recover,
        policies=RetryPolicy(initial_delay=0.05, max_delay=0.1, jitter=Jitter.NONE),
    )
    async with handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == 1, 30, f"the {name} dead letter to recover")
        metrics = handler.get_metrics()

    first, second = seen
    assert first.original == case.original
    assert first.failure.error_class == case.error_class
    assert (first.attempts, first.first_failure, first.last_failure) == (
        case.attempts,
        case.first_failure,
        case.last_failure,
    )
    assert first.source_format == case.source_format
    # The handler's own failure is one more attempt; the first failure time is carried, never reset.
    assert second.original == case.original
    assert second.attempts == case.attempts + 1
    assert second.first_failure == case.first_failure
    assert second.last_failure is not None and second.last_failure > case.last_failure
    assert second.failure.error_class == "builtins.ConnectionError"
    assert metrics["parked"] == 0
