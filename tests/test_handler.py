"""The DLQ handler against the real broker and Redis: every dead letter leaves by exactly one door."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection as RedisConnection
from redis.exceptions import TimeoutError as RedisTimeoutError

from kafka_dlq import handler as handler_module
from kafka_dlq.breaker import BreakerSettings, CircuitBreaker, CircuitState
from kafka_dlq.classify import Classifier
from kafka_dlq.errors import ConfigError
from kafka_dlq.formats import decode, encode_native
from kafka_dlq.handler import DLQHandler, KeyFormat
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.loop_lag import LoopLagProbe
from kafka_dlq.outcomes import Outcome, ParkNow, Reason
from kafka_dlq.policy import Jitter, RetryPolicy
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.schedule import Entry, RedisSchedule, ScheduleError, check_waitaof, connect_redis
from kafka_dlq.testing.servers import RedisServer
from tests.conftest import wait_for
from tests.helpers import committed_offsets, read_all, seed

HOUR_MS = 3600 * 1000


def dead_letter(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    *,
    attempts: int = 1,
    error_class: str = "builtins.RuntimeError",
    message: str = "boom",
    first_failure: int | None = None,
    redrive_count: int = 0,
    headers: tuple[tuple[str, bytes | None], ...] = (),
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    now = int(time.time() * 1000)
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(
                topic=topic, partition=0, offset=7, timestamp=now, key=key, value=value, headers=headers
            ),
            failure=Failure(error_class=error_class, message=message, stacktrace="Traceback ..."),
            attempts=attempts,
            first_failure=first_failure or now,
            last_failure=now,
            group="orders-service",
            redrive_count=redrive_count,
        )
    )
    return encoded.key, encoded.value, list(encoded.headers)


@dataclass
class Processor:
    """A processor whose behaviour is scripted per key: fail the first ``fail_first[key]`` calls."""

    fail_first: dict[bytes, int] = field(default_factory=dict)
    fatal: set[bytes] = field(default_factory=set)
    calls: Counter[bytes] = field(default_factory=Counter)
    seen: list[DeadLetter] = field(default_factory=list)

    async def __call__(self, dl: DeadLetter) -> None:
        key = dl.original.key or b""
        self.calls[key] += 1
        self.seen.append(dl)
        if key in self.fatal:
            raise KeyError(f"customer {key!r} deleted")
        if self.calls[key] <= self.fail_first.get(key, 0):
            raise ConnectionError("downstream said 503")


@pytest.fixture
def dlq(new_topic):
    """A DLQ topic and its poison topic."""

    def make(partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = new_topic(partitions, config, prefix="orders.dlq")
        from kafka_dlq.kafka.admin import create_topics

        create_topics(_bootstrap[0], {f"{name}.poison": 1}, config=config)
        return name

    return make


_bootstrap: list[str] = []


@pytest.fixture(autouse=True)
def _remember_bootstrap(kafka_bootstrap):
    _bootstrap[:] = [kafka_bootstrap]


def _handler(kafka_bootstrap, redis_url, unique_name, topics, **kwargs) -> DLQHandler:
    return DLQHandler(
        name=unique_name("h"), topics=topics, bootstrap_servers=kafka_bootstrap, redis_url=redis_url, **kwargs
    )


def _poison(kafka_bootstrap, dlq_topic, expected=None) -> list:
    return read_all(kafka_bootstrap, f"{dlq_topic}.poison", expected=expected, idle=2)


async def _settled(*handlers: DLQHandler, timeout: float = 30) -> None:
    """Wait until nothing is left to do: the schedules empty and no attempt running, so counts can no longer move."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        totals = [(await h.schedule.pending())["total"] for h in handlers]
        if not any(totals) and not any(h._active for h in handlers):
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for the handlers to settle: pending {totals}")
        await asyncio.sleep(0.05)


async def test_seed_scenario_five_records_fail_once_then_recover(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    records = [dead_letter("orders", f"order-{i}".encode(), b'{"id": %d}' % i) for i in range(5)]
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records)
    processor = Processor(fail_first={f"order-{i}".encode(): 1 for i in range(5)})
    policy = RetryPolicy(max_attempts=3, initial_delay=1, multiplier=2, jitter=Jitter.NONE)
    started = time.monotonic()

    async with _handler(
        kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": processor}, policies=policy
    ) as handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == 5, 15, "5 records recovered")
        metrics = handler.get_metrics()

    print(f"\nseed scenario: recovered 5 in {time.monotonic() - started:.1f} s; metrics {metrics}")
    assert metrics["messages_processed"] == 5
    assert metrics["messages_retried"] == 5
    assert metrics["messages_recovered"] == 5
    assert metrics["messages_poisoned"] == 0
    assert all(count == 2 for count in processor.calls.values())
    assert processor.seen[-1].attempts == 2  # the upstream failure and the handler's first


async def test_a_thousand_mixed_records_each_leave_by_the_right_door(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq, 3)
    old = int(time.time() * 1000) - 48 * HOUR_MS
    plan: dict[bytes, str] = {}
    records = []
    for i in range(1000):
        key = f"k{i:04d}".encode()
        kind = ["recover", "recover", "fatal", "undecodable", "no_processor", "too_old", "repeat"][i % 7]
        plan[key] = kind
        if kind == "undecodable":
            records.append((key, b"not a dead letter", [("x", b"1")]))
        elif kind == "no_processor":
            records.append(dead_letter("unknown-topic", key, b"v"))
        elif kind == "too_old":
            records.append(dead_letter("orders", key, b"v", first_failure=old))
        elif kind == "repeat":
            records.append(dead_letter("orders", key, b"v", redrive_count=3))
        else:
            records.append(dead_letter("orders", key, b"v"))
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records)
    processor = Processor(
        fail_first={k: (i % 3) for i, (k, kind) in enumerate(plan.items()) if kind == "recover"},
        fatal={k for k, kind in plan.items() if kind == "fatal"},
    )
    policy = RetryPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=10, max_age=24 * 3600)
    classifier = Classifier(non_retryable=[KeyError], repeat_offender_threshold=1)

    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": processor},
        policies=policy,
        classifier=classifier,
    ) as handler:
        await wait_for(
            lambda: handler.get_metrics()["recovered"] + handler.get_metrics()["parked"] >= 1000,
            60,
            "every record recovered or parked",
        )
        await _settled(handler)
        metrics = handler.get_metrics()
        pending = await handler.schedule.pending()

    # Read until the topic is idle, not until the count expected: a record parked twice must show.
    poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic)
    reasons = {m.key(): dict(m.headers())["dlq.reason"].decode() for m in poison}
    expected_reason = {
        "fatal": "non_retryable",
        "undecodable": "undecodable",
        "no_processor": "no_processor",
        "too_old": "max_age",
        "repeat": "repeat_offender",
    }
    recovered = {k for k, kind in plan.items() if kind == "recover"}
    assert metrics["consumed"] == 1000
    assert metrics["recovered"] == len(recovered)
    assert metrics["parked"] == 1000 - len(recovered) == len(poison) == len(reasons)
    assert metrics["recovered"] + metrics["parked"] == 1000
    assert pending["total"] == 0
    assert {k: expected_reason[plan[k]] for k in reasons} == reasons
    assert set(processor.calls) >= recovered
    assert all(processor.calls[k] == 1 + processor.fail_first[k] for k in recovered)
    assert metrics["parked_by_reason"] == dict(Counter(reasons.values()))


async def test_equal_payloads_in_different_records_are_different_records(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    same = dead_letter("orders", b"same-key", b"same-value")
    await asyncio.to_thread(seed, kafka_bootstrap, topic, [same, same, same])
    processor = Processor()
    async with _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": processor}) as h:
        await wait_for(lambda: h.get_metrics()["recovered"] == 3, 15, "3 recovered")
    assert processor.calls[b"same-key"] == 3


async def test_bad_input_is_parked_with_a_precise_reason_and_the_handler_keeps_running(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    big = {"max.message.bytes": str(8 * 1024 * 1024)}
    topic = await asyncio.to_thread(dlq, 1, big)
    good = dead_letter("orders", b"good", b"v")
    bad_utf8_key = dead_letter("orders", b"\xff\xfe-key", b"v")
    missing_topic = (b"k1", b"v", [("dlq.error.class", b"x.Y"), ("dlq.attempts", b"1")])
    negative_attempts = (b"k2", b"v", [("dlq.original.topic", b"orders"), ("dlq.attempts", b"-3")])
    absurd_attempts = (b"k3", b"v", [("dlq.original.topic", b"orders"), ("dlq.attempts", b"99999999999")])
    non_json = (b"k4", b"{not json", [])
    unknown = (b"k5", b"\x00\x01binary", [("content-type", b"application/avro")])
    bad_utf8_header = (b"k6", b"v", [("dlq.original.topic", b"ord\xffers")])
    huge = dead_letter("orders", b"huge", b"x" * (5 * 1024 * 1024))
    records = [
        missing_topic,
        negative_attempts,
        absurd_attempts,
        non_json,
        unknown,
        bad_utf8_header,
        bad_utf8_key,
        huge,
        good,
    ]
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records)
    processor = Processor()
    async with _handler(
        kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": processor}, max_record_bytes=1024 * 1024
    ) as handler:
        await wait_for(
            lambda: handler.get_metrics()["recovered"] + handler.get_metrics()["parked"] == 9, 30, "9 outcomes"
        )
        assert handler._tasks and not any(t.done() for t in handler._tasks)  # still running
        metrics = handler.get_metrics()
    poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic)
    by_key = {m.key(): dict(m.headers()) for m in poison}
    assert len(poison) == len(by_key) == 8
    for key in (b"k1", b"k2", b"k3", b"k4", b"k5", b"k6"):
        assert by_key[key]["dlq.reason"] == b"undecodable", key
    assert b"missing original topic" in by_key[b"k1"]["dlq.error.message"]
    assert by_key[b"huge"]["dlq.reason"] == b"non_retryable"
    assert b"max_record_bytes" in by_key[b"huge"]["dlq.error.message"]
    # A key that is not UTF-8 text is bad input by default: parked, its key kept byte for byte, saying why and
    # how to accept such keys.
    assert by_key[b"\xff\xfe-key"]["dlq.reason"] == b"undecodable"
    message = by_key[b"\xff\xfe-key"]["dlq.error.message"].decode()
    assert "the original key is not UTF-8 text (invalid UTF-8 at byte 0 of 6)" in message
    assert "keys=KeyFormat.BYTES" in message
    assert processor.calls == Counter({b"good": 1})
    assert [m.value() for m in poison if m.key() == b"k4"] == [b"{not json"]  # parked as it came
    assert metrics["recovered"] == 1 and metrics["parked"] == 8 and metrics["consumed"] == 9


async def test_with_binary_keys_accepted_a_key_that_is_not_utf8_recovers_byte_for_byte(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq)
    binary = b"\xff\xfe\x00-key"
    await asyncio.to_thread(seed, kafka_bootstrap, topic, [dead_letter("orders", binary, b"v")])
    processor = Processor()

    async with _handler(
        kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": processor}, keys=KeyFormat.BYTES
    ) as handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == 1, 15, "recovered")
        metrics = handler.get_metrics()

    assert processor.calls == Counter({binary: 1})
    assert processor.seen[0].original.key == binary
    assert metrics["parked"] == 0


async def test_a_downstream_outage_opens_the_circuit_then_closes_it(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"o{i}".encode(), b"v") for i in range(20)]
    )
    outage = {"down": True}
    calls: list[float] = []

    async def downstream(dl: DeadLetter) -> None:
        calls.append(time.monotonic())
        if outage["down"]:
            raise ConnectionError("billing unavailable")

    policy = RetryPolicy(initial_delay=0.05, max_delay=0.1, max_attempts=50)
    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": downstream},
        policies=policy,
        breaker=BreakerSettings(failure_threshold=5, open_seconds=1.0),
        concurrency=1,
    ) as handler:
        await wait_for(lambda: handler.breaker("orders").state.value == "open", 15, "the circuit to open")
        await wait_for(lambda: handler.get_metrics()["deferred"] > 0, 15, "due retries deferred")
        attempts_while_open = handler.get_metrics()["retried"]
        outage["down"] = False
        await wait_for(lambda: handler.get_metrics()["recovered"] == 20, 30, "all recovered after the outage")
        assert handler.breaker("orders").state.value == "closed"
        assert handler.breaker("orders").times_opened >= 1
        metrics = handler.get_metrics()
    assert metrics["parked"] == 0
    # The open circuit deferred retries without spending attempts: far fewer failures than calls would have made.
    assert attempts_while_open < 20 * 5


async def test_two_instances_share_the_work_and_never_run_one_record_at_once(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq, 4)
    total = 400
    running: set[bytes] = set()
    overlaps: list[bytes] = []
    by_instance: Counter[str] = Counter()

    def processor_for(instance: str):
        async def process(dl: DeadLetter) -> None:
            key = dl.original.key or b""
            if key in running:
                overlaps.append(key)
            running.add(key)
            by_instance[instance] += 1
            await asyncio.sleep(0.005)
            running.discard(key)
            if int(key[1:]) % 4 == 0 and dl.attempts < 2:
                raise ConnectionError("once")

        return process

    name = unique_name("shared")
    common = dict(
        name=name,
        topics=[topic],
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        policies=RetryPolicy(initial_delay=0.05, max_delay=0.1),
    )
    first = DLQHandler(**common, processors={"orders": processor_for("a")})
    second = DLQHandler(**common, processors={"orders": processor_for("b")})
    async with first, second:
        # Both members are in the group before any work arrives, so neither can finish it all alone.
        await wait_for(lambda: bool(first._consumer and first._consumer._current), 60, "the first member assigned")
        await wait_for(lambda: bool(second._consumer and second._consumer._current), 60, "the second member assigned")
        await asyncio.to_thread(
            seed, kafka_bootstrap, topic, [dead_letter("orders", f"r{i}".encode(), b"v") for i in range(total)]
        )
        await wait_for(
            lambda: first.get_metrics()["recovered"] + second.get_metrics()["recovered"] >= total, 60, "all recovered"
        )
        await _settled(first, second)
        a, b = first.get_metrics(), second.get_metrics()
    print(f"\ntwo instances: calls {dict(by_instance)}; consumed {a['consumed']} + {b['consumed']}")
    # Each record was consumed by exactly one member (DLQ partitions) and recovered exactly once (either may run
    # any due retry from the shared schedule).
    assert a["consumed"] + b["consumed"] == total
    assert a["consumed"] > 0 and b["consumed"] > 0
    assert a["recovered"] + b["recovered"] == total
    assert a["parked"] + b["parked"] == 0
    assert overlaps == []
    assert by_instance["a"] > 0 and by_instance["b"] > 0


async def test_under_load_the_loop_never_stalls(kafka_bootstrap, redis_url, unique_name, dlq, frozen_heap):
    topic = await asyncio.to_thread(dlq, 2)
    total = 5000
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"l{i}".encode(), b"x" * 512) for i in range(total)]
    )

    async def noop(dl: DeadLetter) -> None:
        return None

    handler = _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": noop})
    async with LoopLagProbe() as probe, handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == total, 60, "all recovered")
    lag = probe.summary()
    print(f"\nhandler loop lag ({total} records): {lag}")
    assert lag["max"] < 250, lag


async def test_a_processor_may_park_a_record_now(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(seed, kafka_bootstrap, topic, [dead_letter("orders", b"p", b"v")])

    def sync_processor(dl: DeadLetter) -> None:  # a sync processor runs in a thread
        time.sleep(0.01)
        raise ParkNow("customer closed the account", reason=Reason.NON_RETRYABLE)

    async with _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": sync_processor}) as h:
        await wait_for(lambda: h.get_metrics()["parked"] == 1, 15, "parked")
    poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic, 1)
    parked = decode(
        KafkaRecord(
            topic="p",
            partition=0,
            offset=0,
            key=poison[0].key(),
            value=poison[0].value(),
            headers=tuple(poison[0].headers()),
        )
    )
    assert isinstance(parked, DeadLetter)
    assert parked.reason is Reason.NON_RETRYABLE
    assert parked.attempts == 2
    assert parked.failure.error_class == "kafka_dlq.outcomes.ParkNow"


# ---------------------------------------------------------------- the schedule's writes are durable before they count


@pytest.fixture
def redis_sends(monkeypatch) -> list[bytes]:
    """What the asyncio Redis client puts on the wire, one item per send (a pipeline is one send), recorded on the
    way to the real server."""
    sends: list[bytes] = []
    original = RedisConnection.send_packed_command

    async def recording(self, command, check_health=True):
        parts = [command] if isinstance(command, bytes | str) else list(command)
        sends.append(b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts))
        return await original(self, parts if len(parts) > 1 else parts[0], check_health)

    monkeypatch.setattr(RedisConnection, "send_packed_command", recording)
    return sends


def _entry(offset: int) -> Entry:
    dl = DeadLetter(
        original=OriginalRecord(topic="orders", partition=0, offset=offset, key=b"k", value=b"v"),
        failure=Failure(error_class="builtins.RuntimeError", message="boom"),
        dlq=DlqCoordinates(topic="orders.dlq", partition=0, offset=offset),
    )
    return Entry(dead_letter=dl)


async def test_with_waitaof_each_schedule_write_waits_on_its_own_connection(redis_url, unique_name, redis_sends):
    # The session's Redis runs with AOF on. Where it has WAITAOF (7.2+) the whole path runs for real; where it
    # has not, the schedule is told it has, so that what it sends is seen, and the server's refusal must surface.
    async with RedisSchedule(redis_url, unique_name("aof")) as schedule:
        assert schedule.aof_enabled
        real = schedule.waitaof
        schedule.waitaof = True
        redis_sends.clear()
        try:
            await schedule.add([(_entry(1), 0)])
        except ScheduleError as exc:
            assert not real, exc
            assert "WAITAOF" in str(exc)  # refused, and said so: the write is not taken as durable
        writes = [send for send in redis_sends if b"EVALSHA" in send or b"WAITAOF" in send]
        # Each send carries the script and then the WAITAOF that covers it: same connection, same round trip.
        # (More than one when the server did not know the script yet: loaded, then sent again.)
        assert writes, redis_sends
        for send in writes:
            assert b"EVALSHA" in send and b"WAITAOF" in send.partition(b"EVALSHA")[2], send
            # and a write that is always made between them, so a resent script that writes nothing still waits
            assert b"INCR" in send.partition(b"EVALSHA")[2].partition(b"WAITAOF")[0], send
        assert await schedule.client.hexists(schedule.keys["body"], _entry(1).id)
        if real:
            claimed, _ = await schedule.claim(10, 30)
            assert [c.entry.id for c in claimed] == [_entry(1).id]
            assert await schedule.finish(claimed[0], Outcome.RECOVERED)
            assert (await schedule.pending())["total"] == 0


async def test_a_finish_sent_again_by_the_claim_that_made_it_is_done_not_a_lost_claim(redis_url, unique_name):
    # A finish whose reply was lost with its connection is sent again: the entry is already finished by that claim.
    async with RedisSchedule(redis_url, unique_name("refinish")) as schedule:
        await schedule.add([(_entry(1), 0), (_entry(2), 0)])
        claimed, _ = await schedule.claim(10, 30)
        first, second = sorted(claimed, key=lambda c: c.entry.id)

        assert await schedule.finish(first, Outcome.RECOVERED)
        assert await schedule.finish(first, Outcome.RECOVERED)  # sent again
        assert await schedule.finish(second, Outcome.RETRY, due_ms=int(time.time() * 1000) + HOUR_MS)
        assert await schedule.finish(second, Outcome.RETRY, due_ms=int(time.time() * 1000) + HOUR_MS)

        assert len(await schedule.history("recovered")) == 1  # done once
        assert (await schedule.pending()) == {"due": 1, "inflight": 0, "total": 1}
        # Another claim's finish is still refused: only the token that finished the entry is answered yes.
        assert not await schedule.finish(replace(first, token="another claim"), Outcome.RECOVERED)


async def test_a_dead_letter_counted_twice_as_a_repeat_counts_once(redis_url, unique_name):
    async with RedisSchedule(redis_url, unique_name("repeats")) as schedule:
        assert await schedule.count_repeat("fp", "orders.dlq/0/5") == 1
        assert await schedule.count_repeat("fp", "orders.dlq/0/5") == 1  # read again, or sent again
        assert await schedule.count_repeat("fp", "orders.dlq/0/9") == 2  # the same content failing again
        assert await schedule.count_repeat("other", "orders.dlq/0/9") == 1
        # What it remembers is bounded by the TTL: a pair counted longer ago than that is forgotten at the next count.
        seen = schedule.keys["repeats:seen"]
        await schedule.client.zadd(seen, {"fp orders.dlq/0/1": 0})
        assert await schedule.count_repeat("fp", "orders.dlq/0/10") == 3
        assert await schedule.client.zscore(seen, "fp orders.dlq/0/1") is None
        assert await schedule.client.zcard(seen) == 4


async def test_the_schedules_client_does_not_send_a_command_again_when_its_reply_is_slow():
    # A server that takes commands and never answers the one that matters: redis-py's Retry resends on a reply
    # timeout by default, although the server may have run the command (a count, a finish) already.
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.startswith(b"*"):
                    continue
                parts = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                received.append(parts[0].upper())
                if parts[0].upper() in (b"HELLO", b"CLIENT"):  # the connection's handshake is answered
                    writer.write(b"+OK\r\n")
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect_redis(f"redis://127.0.0.1:{port}/0", retries=2, socket_timeout=0.3)
    try:
        with pytest.raises(RedisTimeoutError):
            await client.incr("count")
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert received.count(b"INCRBY") == 1, received


def test_a_waitaof_reply_without_the_local_fsync_is_an_error():
    check_waitaof([1, 0])
    check_waitaof([2, 1])
    for reply in ([0, 0], [0, 3], None, []):
        with pytest.raises(ScheduleError, match="append-only file"):
            check_waitaof(reply)


# ---------------------------------------------------------------- the circuit breaker


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_half_open_circuit_lets_one_trial_through_and_its_verdict_decides():
    clock = _Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_seconds=10), clock=clock)
    breaker.failure(breaker.allow())
    breaker.failure(breaker.allow())
    assert breaker.state is CircuitState.OPEN and not breaker.allow()

    clock.now = 10
    trial = breaker.allow()  # the trial
    assert trial is not None
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.failure(trial)
    assert breaker.state is CircuitState.OPEN and breaker.times_opened == 2

    clock.now = 20
    trial = breaker.allow()
    assert trial is not None
    breaker.success(trial)
    assert breaker.state is CircuitState.CLOSED and breaker.allow()


def test_a_trial_that_ends_without_a_verdict_frees_the_next_trial():
    clock = _Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, open_seconds=1), clock=clock)
    breaker.failure(breaker.allow())
    clock.now = 1
    trial = breaker.allow()
    assert trial is not None

    breaker.abandon(trial)  # the trial was parked for its content, or cancelled: it says nothing of the downstream

    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()  # not stuck behind a trial that will never report


async def test_a_half_open_trial_that_parks_its_record_does_not_leave_the_circuit_stuck(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"o{i}".encode(), b"v") for i in range(6)]
    )
    phase = {"now": "down"}
    calls: list[tuple[bytes, str]] = []

    async def downstream(dl: DeadLetter) -> None:
        calls.append((dl.original.key or b"", phase["now"]))
        if phase["now"] == "down":
            raise ConnectionError("billing unavailable")
        if phase["now"] == "park the trial":
            phase["now"] = "up"
            raise ParkNow("customer closed the account", reason=Reason.NON_RETRYABLE)

    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": downstream},
        policies=RetryPolicy(initial_delay=0.05, max_delay=0.1, max_attempts=50),
        breaker=BreakerSettings(failure_threshold=2, open_seconds=0.5),
        concurrency=1,
    ) as handler:
        await wait_for(lambda: handler.breaker("orders").state is CircuitState.OPEN, 15, "the circuit to open")
        phase["now"] = "park the trial"  # the next call is the half-open trial, and it parks its record
        await wait_for(
            lambda: handler.get_metrics()["recovered"] + handler.get_metrics()["parked"] == 6,
            20,
            "every record recovered or parked after the trial",
        )
        metrics = handler.get_metrics()
        state = handler.breaker("orders").state
    assert [when for _, when in calls].count("park the trial") == 1
    assert metrics["parked"] == 1 and metrics["recovered"] == 5
    assert state is CircuitState.CLOSED


async def test_claims_waiting_for_a_slot_are_deferred_once_the_circuit_opens(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"o{i}".encode(), b"v") for i in range(10)]
    )
    calls: list[bytes] = []

    async def downstream(dl: DeadLetter) -> None:
        calls.append(dl.original.key or b"")
        await asyncio.sleep(0.05)
        raise ConnectionError("billing unavailable")

    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": downstream},
        breaker=BreakerSettings(failure_threshold=1, open_seconds=60),
        concurrency=1,
    ) as handler:
        await wait_for(lambda: handler.get_metrics()["deferred"] == 9, 15, "the other nine deferred")
        metrics = handler.get_metrics()
    # The first failure opened the circuit; the nine queued behind it for the one slot never reached the downstream.
    assert len(calls) == 1
    assert metrics["retried"] == 1 and metrics["deferred"] == 9


async def test_records_parked_for_their_content_do_not_open_the_circuit(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    records = [dead_letter("orders", f"bad{i}".encode(), b"v") for i in range(5)]
    records += [dead_letter("orders", f"good{i}".encode(), b"v") for i in range(3)]
    await asyncio.to_thread(seed, kafka_bootstrap, topic, records)

    async def process(dl: DeadLetter) -> None:
        key = dl.original.key or b""
        if key.startswith(b"bad"):
            if key.endswith(b"4"):
                raise ParkNow("refund already issued")
            raise KeyError(f"customer {key!r} deleted")

    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": process},
        classifier=Classifier(non_retryable=[KeyError]),
        breaker=BreakerSettings(failure_threshold=2, open_seconds=60),
        concurrency=1,
    ) as handler:
        await wait_for(
            lambda: handler.get_metrics()["parked"] == 5 and handler.get_metrics()["recovered"] == 3,
            15,
            "5 parked and 3 recovered",
        )
        metrics = handler.get_metrics()
        breaker = handler.breaker("orders")
    assert breaker.state is CircuitState.CLOSED and breaker.times_opened == 0
    assert metrics["deferred"] == 0


# ---------------------------------------------------------------- leases


async def test_a_claim_queued_for_a_slot_keeps_its_lease_and_runs_once(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    total = 12
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"q{i}".encode(), b"v") for i in range(total)]
    )
    calls: Counter[bytes] = Counter()
    running: set[bytes] = set()
    overlaps: list[bytes] = []

    async def slow(dl: DeadLetter) -> None:
        key = dl.original.key or b""
        calls[key] += 1
        if key in running:
            overlaps.append(key)
        running.add(key)
        await asyncio.sleep(0.25)
        running.discard(key)

    # One slot, twelve claims, a 2.5 s lease: the last claim waits ~2.75 s for its slot, past its lease. A call
    # (0.25 s) has 0.75 s to spare before its timeout, so a loaded machine does not turn it into a failure.
    async with _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": slow},
        concurrency=1,
        processor_timeout=1.0,
        lease=2.5,
    ) as handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == total, 30, "all recovered")
        await wait_for(lambda: not handler._active, 5, "no attempt left running")
        pending = await handler.schedule.pending()
        lost = handler.metrics.registry.get_sample_value("kafka_dlq_lost_claims_total", {"handler": handler.name})
    assert calls == Counter({f"q{i}".encode(): 1 for i in range(total)})
    assert overlaps == []
    assert lost in (0, None)  # no claim lost (the counter may not even exist yet)
    assert pending["total"] == 0


async def test_a_claim_queued_for_a_slot_takes_it_even_when_each_renewal_outlasts_half_the_slack(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"s{i}".encode(), b"v") for i in range(3)]
    )
    calls: Counter[bytes] = Counter()

    async def slow(dl: DeadLetter) -> None:
        calls[dl.original.key or b""] += 1
        await asyncio.sleep(0.9)  # past the first renewal point of the claims queued behind it

    handler = _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": slow},
        concurrency=1,
        processor_timeout=1.0,
        lease=2.5,
    )
    renew = handler.schedule.renew

    async def slow_renew(claimed, lease, now_ms=None):
        # A round trip of 0.9 s, over half the lease's slack (0.75 s): by the time the renewal answers, the next
        # one is already due. The lease still counts from when it was asked for.
        asked = int(time.time() * 1000)
        await asyncio.sleep(0.9)
        return await renew(claimed, lease, now_ms=asked)

    handler.schedule.renew = slow_renew  # type: ignore[method-assign]
    async with handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == 3, 30, "all three recovered")
    assert calls == Counter({f"s{i}".encode(): 1 for i in range(3)})


async def test_a_claim_with_too_little_lease_left_renews_before_it_takes_a_free_slot(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    # A claim taken at intake can wait for its turn (and for the write that took it to be durable) with a slot free
    # all along: if less than a call's time is left of its lease, it renews first, or the lease could end mid-call
    # and another instance run the record at the same time.
    topic = await asyncio.to_thread(dlq)
    handler = _handler(kafka_bootstrap, redis_url, unique_name, [topic], processor_timeout=2.0, lease=3.0)
    async with handler:
        entry = Entry(
            dead_letter=DeadLetter(
                original=OriginalRecord(topic="orders", key=b"k", value=b"v"),
                dlq=DlqCoordinates(topic=topic, partition=0, offset=99),
            )
        )
        taken_at = int(time.time() * 1000) - 2500  # half a second of the 3 s lease left
        _, (claimed,) = await handler.schedule.add_and_claim([(entry, taken_at)], 1, lease=3.0, now_ms=taken_at)
        kept, holding = await handler._acquire(asyncio.Semaphore(1), claimed)
        deadline = await handler.schedule.client.zscore(handler.schedule.keys["inflight"], entry.id)
    assert holding and kept is not None
    assert kept.claimed_at_ms > claimed.claimed_at_ms
    assert deadline is not None and deadline >= time.time() * 1000 + 2000  # a call's time and more ahead


def test_a_lease_must_outlast_the_processor_timeout_by_a_second():
    with pytest.raises(ConfigError, match="at least 1 s longer than processor_timeout"):
        DLQHandler(
            name="lease",
            topics=["t"],
            bootstrap_servers="127.0.0.1:1",
            redis_url="redis://127.0.0.1:1/0",
            processor_timeout=2.0,
            lease=2.5,
        )


async def test_a_claim_that_renewed_its_lease_too_often_waiting_for_a_slot_goes_back_to_due(
    kafka_bootstrap, redis_url, unique_name, dlq, monkeypatch
):
    monkeypatch.setattr(handler_module, "_MAX_RENEWALS", 1)
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"w{i}".encode(), b"v") for i in range(2)]
    )
    calls: Counter[bytes] = Counter()

    async def slow(dl: DeadLetter) -> None:
        calls[dl.original.key or b""] += 1
        await asyncio.sleep(1.5)  # the claim behind it renews at 0.5 s and 1 s, then gives up

    handler = _handler(
        kafka_bootstrap,
        redis_url,
        unique_name,
        [topic],
        processors={"orders": slow},
        concurrency=1,
        processor_timeout=2.0,
        lease=3.0,
    )
    deferred: list[str] = []
    defer = handler.schedule.defer

    async def recording_defer(claimed, due_ms):
        deferred.append(claimed.entry.dead_letter.original.key)
        return await defer(claimed, due_ms)

    handler.schedule.defer = recording_defer  # type: ignore[method-assign]
    async with handler:
        await wait_for(lambda: handler.get_metrics()["recovered"] == 2, 30, "both recovered")
        lost = handler.metrics.registry.get_sample_value("kafka_dlq_lost_claims_total", {"handler": handler.name})
    assert deferred  # handed back rather than renewed for ever
    assert calls == Counter({b"w0": 1, b"w1": 1})  # and claimed again, and run once
    assert lost in (0, None)


async def test_claims_still_waiting_for_a_slot_at_stop_start_no_new_call(kafka_bootstrap, redis_url, unique_name, dlq):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"z{i}".encode(), b"v") for i in range(3)]
    )
    calls: list[bytes] = []

    async def slow(dl: DeadLetter) -> None:
        calls.append(dl.original.key or b"")
        await asyncio.sleep(1.0)

    handler = _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": slow}, concurrency=1)
    await handler.start()
    try:
        await wait_for(lambda: len(calls) == 1 and len(handler._active) == 3, 30, "one call, two claims queued")
    finally:
        await handler.stop()
    async with RedisSchedule(redis_url, handler.name) as schedule:
        pending = await schedule.pending()
        recovered = await schedule.history("recovered")
    assert len(calls) == 1  # the two queued behind it were handed back, not called during the stop
    assert len(recovered) == 1
    assert pending == {"due": 2, "inflight": 0, "total": 2}


async def test_a_record_whose_claim_was_lost_during_the_call_is_not_parked_by_this_instance(
    kafka_bootstrap, redis_url, unique_name, dlq
):
    topic = await asyncio.to_thread(dlq)
    await asyncio.to_thread(seed, kafka_bootstrap, topic, [dead_letter("orders", b"taken", b"v")])
    holder: list[DLQHandler] = []

    async def process(dl: DeadLetter) -> None:
        # Meanwhile the lease ran out and another instance claimed the record: its claim is not this call's now.
        schedule = holder[0].schedule
        await schedule.client.hset(schedule.keys["claims"], str(dl.dlq), "another instance's claim")
        raise ParkNow("refund already issued")

    async with _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": process}) as handler:
        holder.append(handler)
        await wait_for(
            lambda: (
                handler.metrics.registry.get_sample_value("kafka_dlq_lost_claims_total", {"handler": handler.name}) == 1
            ),
            30,
            "the lost claim counted",
        )
        metrics = handler.get_metrics()
    poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic)
    assert poison == []  # the instance that holds the claim decides; this one wrote nothing
    assert metrics["parked"] == 0


# ---------------------------------------------------------------- intake: every record once, whatever fails


async def test_an_undecodable_record_too_large_for_the_poison_topic_is_parked_without_its_value(
    kafka_bootstrap, redis_url, unique_name, new_topic
):
    # The DLQ topic holds 8 MiB records; its poison topic, the broker's default 1 MiB.
    topic = await asyncio.to_thread(new_topic, 1, {"max.message.bytes": str(8 * 1024 * 1024)}, "orders.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{topic}.poison": 1})
    huge_unknown = (b"blob", b"\x00\x01" * (1024 * 1024), [("content-type", b"application/avro")])
    after = dead_letter("orders", b"after", b"v")
    await asyncio.to_thread(seed, kafka_bootstrap, topic, [huge_unknown, after])
    processor = Processor()

    async with _handler(kafka_bootstrap, redis_url, unique_name, [topic], processors={"orders": processor}) as handler:
        # The record behind it is not stalled behind a park that can never be written.
        await wait_for(lambda: handler.get_metrics()["recovered"] == 1, 30, "the record behind it recovered")
        await wait_for(lambda: handler.get_metrics()["parked"] == 1, 30, "the huge one parked")
        metrics = handler.get_metrics()
        group = handler.group_id
    poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic)
    committed = await asyncio.to_thread(committed_offsets, kafka_bootstrap, group, topic, 1)

    assert len(poison) == 1
    headers = dict(poison[0].headers())
    assert poison[0].key() == b"blob" and poison[0].value() is None
    assert headers["dlq.reason"] == b"undecodable"
    assert headers["content-type"] == b"application/avro"  # the record's own headers stay
    message = headers["dlq.error.message"].decode()
    assert f"value of {2 * 1024 * 1024} bytes not copied" in message
    assert f"original at {topic}/0/0" in message
    assert metrics["consumed"] == 2 and metrics["parked_by_reason"] == {"undecodable": 1}
    assert committed == {0: 2}


async def test_an_intake_batch_retried_after_redis_fails_counts_and_parks_each_record_once(
    kafka_bootstrap, unique_name, dlq, tmp_path
):
    # A Redis of this test's own, stopped under the running handler: its parks reach Kafka, its schedule write
    # fails, and the batch is tried again once Redis is back.
    redis = await asyncio.to_thread(RedisServer, data_dir=tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(redis.start)
    try:
        topic = await asyncio.to_thread(dlq)
        records = [(f"bad{i}".encode(), b"not a dead letter", []) for i in range(5)]
        records += [dead_letter("orders", f"good{i}".encode(), b"v") for i in range(5)]
        processor = Processor()
        async with _handler(
            kafka_bootstrap, redis.url, unique_name, [topic], processors={"orders": processor}
        ) as handler:
            await asyncio.to_thread(redis.stop)
            await asyncio.to_thread(seed, kafka_bootstrap, topic, records)
            await wait_for(
                lambda: handler.get_metrics()["consumed"] == handler.get_metrics()["parked"] == 5,
                30,
                "the parks of the first try of the batch",
            )
            # Only the parks went through: the scheduled half is not durable, so not counted yet.
            assert handler.get_metrics()["consumed"] == handler.get_metrics()["parked"] == 5
            await asyncio.to_thread(redis.start)
            await wait_for(lambda: handler.get_metrics()["recovered"] == 5, 30, "the scheduled half recovered")
            metrics = handler.get_metrics()
        poison = await asyncio.to_thread(_poison, kafka_bootstrap, topic)
    finally:
        await asyncio.to_thread(redis.stop)

    assert metrics["consumed"] == 10
    assert metrics["parked"] == 5 and metrics["recovered"] == 5
    assert sorted(m.key() for m in poison) == [f"bad{i}".encode() for i in range(5)]  # each parked once
    assert processor.calls == Counter({f"good{i}".encode(): 1 for i in range(5)})


# ---------------------------------------------------------------- the loop-lag gauge


@given(
    samples=st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=300),
    q=st.floats(min_value=0, max_value=1),
)
def test_the_loop_lag_percentile_is_the_nearest_rank_of_the_kept_samples(samples, q):
    probe = LoopLagProbe(max_samples=1000)
    for lag in samples:
        probe.add_sample(lag)

    ordered = sorted(samples)
    assert probe.percentile(q) == ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def test_the_loop_lag_gauge_covers_the_last_minute_and_keeps_measuring():
    probe = LoopLagProbe(interval=0.01, window=60.0)
    assert probe.max_samples == 6000
    probe.add_sample(900.0)  # a stall long ago
    for _ in range(200_000):  # half an hour of samples and more: the old probe stopped recording here
        probe.add_sample(1.0)
    probe.add_sample(50.0)

    assert len(probe.samples_ms) == 6000
    assert probe.samples_ms[-1] == 50.0  # still measuring
    assert probe.percentile(0.99) == 1.0 and probe.percentile(1.0) == 50.0  # the old stall is out of the window
    assert probe.max_ms == 900.0  # the run's maximum is kept


def test_a_handler_reports_the_loop_lag_of_the_last_minute():
    handler = DLQHandler(name="lag", topics=["t"], bootstrap_servers="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0")
    assert handler.probe.max_samples * handler.probe.interval == pytest.approx(60.0)
