"""``pending``: the operator's view of a handler's schedule, and retry-now / park / drop, safe while handlers run."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from kafka_dlq.cli import app
from kafka_dlq.errors import ConfigError, TopicNotFoundError
from kafka_dlq.formats import decode
from kafka_dlq.handler import DLQHandler
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.kafka.reader import TopicReader
from kafka_dlq.outcomes import Reason
from kafka_dlq.pending import PendingRetries, Selection
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.schedule import Entry, RedisSchedule
from tests.conftest import wait_for
from tests.helpers import seed
from tests.test_handler import dead_letter

HOUR_MS = 3_600_000


def entry(dlq: str, offset: int, topic: str = "orders", error: str = "builtins.ConnectionError") -> Entry:
    return Entry(
        dead_letter=DeadLetter(
            original=OriginalRecord(topic=topic, partition=0, offset=offset, key=b"k%d" % offset, value=b"v"),
            failure=Failure(error_class=error, message="downstream said 503"),
            attempts=2,
            dlq=DlqCoordinates(topic=dlq, partition=0, offset=offset),
        )
    )


async def read_topic(bootstrap: str, topic: str) -> list[KafkaRecord]:
    async with TopicReader({"bootstrap.servers": bootstrap}, [topic]) as reader:
        return [record async for batch in reader.batches() for record in batch]


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def schedule(redis_url, unique_name):
    """A handler's schedule with ten entries: 0-5 orders (ConnectionError) due in half an hour, 6-9 payments
    (TimeoutError); 6 due in two hours, 8 and 9 held by a handler (live lease for an hour), 7 held under a lease
    that has run out (its handler died)."""
    name = unique_name("h")
    async with RedisSchedule(redis_url, name) as s:
        await s.add((entry("orders.dlq", i, "payments", "app.TimeoutError"), now_ms() - 1000) for i in (7, 8, 9))
        held, _ = await s.claim(10, lease=3600)
        assert sorted(c.entry.id for c in held) == ["orders.dlq/0/7", "orders.dlq/0/8", "orders.dlq/0/9"]
        await s.client.zadd(s.keys["inflight"], {"orders.dlq/0/7": now_ms() - 1})
        await s.add((entry("orders.dlq", i), now_ms() + HOUR_MS // 2) for i in range(6))
        await s.add([(entry("orders.dlq", 6, "payments", "app.TimeoutError"), now_ms() + 2 * HOUR_MS)])
        yield s
        await s.clear()
        await s.client.delete(PendingRetries(redis_url, name).dropped_key)


async def test_summary_counts_and_lists_the_selected_entries(schedule):
    async with PendingRetries(schedule.redis_url, schedule.name) as pending:
        everything = await pending.summary(show=3)
        payments = await pending.summary(Selection(error_class="*Timeout*", state="due"))
        one = await pending.summary(Selection(ids=("orders.dlq/0/2", "orders.dlq/0/99")))

    assert everything.totals == {"due": 7, "inflight": 3, "total": 10}
    assert everything.matched == 10
    assert everything.by_state == {"due": 7, "in_flight": 3}
    assert everything.by_original_topic == {"orders": 6, "payments": 4}
    assert everything.by_error_class == {"builtins.ConnectionError": 6, "app.TimeoutError": 4}
    assert everything.by_due == {"overdue": 0, "1m": 0, "1h": 6, "1d": 1, "later": 0}
    assert everything.expired_leases == 1
    assert [e.id for e in everything.entries] == ["orders.dlq/0/7", "orders.dlq/0/0", "orders.dlq/0/1"]
    assert [e.id for e in payments.entries] == ["orders.dlq/0/6"]
    assert [(e.id, e.state, e.attempts) for e in one.entries] == [("orders.dlq/0/2", "due", 2)]


async def test_retry_now_makes_due_entries_due_and_refuses_claimed_ones(schedule):
    async with PendingRetries(schedule.redis_url, schedule.name, by="alice") as pending:
        result = await pending.retry_now(Selection(ids=("orders.dlq/0/1", "orders.dlq/0/7", "orders.dlq/0/8", "x/0/1")))
        after = {e.id: e for e in await pending.select(Selection(everything=True))}

    assert result.done == ["orders.dlq/0/7", "orders.dlq/0/1"]  # 7's lease had expired: its handler is gone
    assert result.in_flight == ["orders.dlq/0/8"]
    assert result.missing == ["x/0/1"]
    assert not result.ok
    assert after["orders.dlq/0/1"].at <= now_ms() and after["orders.dlq/0/7"].state == "due"
    assert after["orders.dlq/0/8"].state == "in_flight"
    claimed, _ = await schedule.claim(10, lease=30)
    assert {c.entry.id for c in claimed} == {"orders.dlq/0/1", "orders.dlq/0/7"}


async def test_drop_removes_for_good_and_records_who_and_when(schedule):
    before = now_ms()
    async with PendingRetries(schedule.redis_url, schedule.name, by="alice@ops") as pending:
        with pytest.raises(ConfigError, match="no entries selected"):
            await pending.drop(Selection())
        result = await pending.drop(Selection(original_topic="payments"), note="test data")
        history = await pending.dropped()
        left = await pending.summary()

    assert sorted(result.done) == ["orders.dlq/0/6", "orders.dlq/0/7"]
    assert sorted(result.in_flight) == ["orders.dlq/0/8", "orders.dlq/0/9"]
    assert left.totals == {"due": 6, "inflight": 2, "total": 8}
    assert {item["id"] for item in history} == {"orders.dlq/0/6", "orders.dlq/0/7"}
    assert all(item["by"] == "alice@ops" and item["note"] == "test data" for item in history)
    assert all(before <= item["at"] <= now_ms() and item["topic"] == "payments" for item in history)
    # Done: the same dead letter read again from the DLQ is not scheduled again.
    assert await schedule.add([(entry("orders.dlq", 6, "payments"), now_ms())]) == 0


async def test_a_drop_forgets_old_done_entries_with_their_finishing_tokens(schedule):
    keys = schedule.keys
    # An entry a handler finished long ago (older than done_keep): in done, with its finishing token.
    await schedule.client.zadd(keys["done"], {"orders.dlq/0/99": 0})
    await schedule.client.hset(keys["finished"], "orders.dlq/0/99", "an old claim")
    async with PendingRetries(schedule.redis_url, schedule.name, by="alice@ops") as pending:
        result = await pending.drop(Selection(original_topic="payments"))
    assert result.done  # something was dropped, so done was trimmed
    assert await schedule.client.zscore(keys["done"], "orders.dlq/0/99") is None
    assert await schedule.client.hget(keys["finished"], "orders.dlq/0/99") is None  # forgotten together


async def test_park_writes_to_the_poison_topic_then_removes(schedule, kafka_bootstrap, new_topic):
    dlq = await asyncio.to_thread(new_topic, 1, None, "park.dlq")
    await schedule.add((entry(dlq, i), now_ms() + HOUR_MS) for i in range(3))
    config = {"bootstrap.servers": kafka_bootstrap}
    async with PendingRetries(schedule.redis_url, schedule.name, kafka_config=config, by="bob") as pending:
        with pytest.raises(TopicNotFoundError, match=f"{dlq}.poison"):
            await pending.park(Selection(dlq_topic=dlq))
        assert (await pending.summary(Selection(dlq_topic=dlq))).by_state == {"due": 3, "in_flight": 0}  # untouched
        await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
        result = await pending.park(Selection(ids=(f"{dlq}/0/0", f"{dlq}/0/2")), note="customer closed")
        left = await pending.select(Selection(dlq_topic=dlq))
    history = await schedule.history("parked")
    poison = await read_topic(kafka_bootstrap, f"{dlq}.poison")

    assert sorted(result.done) == [f"{dlq}/0/0", f"{dlq}/0/2"] and result.ok
    assert [e.id for e in left] == [f"{dlq}/0/1"]
    assert {(h["id"], h["by"], h["reason"], h["detail"]) for h in history} == {
        (f"{dlq}/0/0", "bob", "manual", "customer closed"),
        (f"{dlq}/0/2", "bob", "manual", "customer closed"),
    }
    parked = [decode(record) for record in poison]
    assert len(parked) == 2
    assert all(isinstance(p, DeadLetter) and p.reason is Reason.MANUAL for p in parked)
    assert sorted(p.original.key for p in parked if isinstance(p, DeadLetter)) == [b"k0", b"k2"]
    assert all("manual park by bob: customer closed" in (p.failure.message or "") for p in parked)  # type: ignore[union-attr]


async def test_parking_everything_while_a_handler_runs_never_takes_what_it_holds(
    kafka_bootstrap, redis_url, unique_name, new_topic
):
    dlq = await asyncio.to_thread(new_topic, 1, None, "busy.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
    total, slots = 20, 5
    await asyncio.to_thread(
        seed, kafka_bootstrap, dlq, [dead_letter("orders", f"b{i}".encode(), b"v") for i in range(total)]
    )
    release = asyncio.Event()
    processed: list[bytes | None] = []

    async def slow(dl: DeadLetter) -> None:
        await release.wait()
        processed.append(dl.original.key)

    handler = DLQHandler(
        name=unique_name("busy"),
        topics=[dlq],
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        processors={"orders": slow},
        max_in_flight=slots,  # the handler holds 5 under live leases, 15 wait due
    )
    config = {"bootstrap.servers": kafka_bootstrap}
    async with handler:
        await wait_for(lambda: handler.get_metrics()["consumed"] == total, 30, "every dead letter scheduled")
        pending = PendingRetries(redis_url, handler.name, kafka_config=config, by="carol")
        async with pending:
            await wait_for(lambda: handler.processor_calls == slots, 15, "the handler to hold its slots")
            result = await pending.park(Selection(everything=True), note="incident 42")
        release.set()
        await wait_for(lambda: handler.get_metrics()["recovered"] == slots, 15, "the held ones to recover")
        totals = await handler.schedule.pending()

    poison = await read_topic(kafka_bootstrap, f"{dlq}.poison")
    assert len(result.done) == total - slots and len(result.in_flight) == slots
    assert len(poison) == total - slots
    assert len(processed) == slots
    assert {record.key for record in poison}.isdisjoint(processed)  # each left by exactly one door
    assert totals["total"] == 0


def test_pending_commands_print_one_json_document_and_fail_on_refusals(
    redis_url, kafka_bootstrap, new_topic, unique_name
):
    name = unique_name("cli")
    dlq = new_topic(1, None, "cli.dlq")
    create_topics(kafka_bootstrap, {f"{dlq}.poison": 1})

    async def given() -> None:
        async with RedisSchedule(redis_url, name) as s:
            await s.add((entry(dlq, i), now_ms() + HOUR_MS) for i in range(4))
            await s.claim(1, lease=3600, now_ms=now_ms() + 2 * HOUR_MS)  # takes 0

    asyncio.run(given())
    env = {"KAFKA_DLQ_REDIS_URL": redis_url, "KAFKA_DLQ_NAME": name, "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    runner = CliRunner()

    listing = runner.invoke(app, ["pending", "--json"], env=env)
    dropped = runner.invoke(app, ["pending", "drop", "--id", f"{dlq}/0/1", "--by", "dan", "--json"], env=env)
    parked = runner.invoke(app, ["pending", "park", "--id", f"{dlq}/0/2", "--note", "bad data", "--json"], env=env)
    refused = runner.invoke(app, ["pending", "drop", "--id", f"{dlq}/0/0"], env=env)
    unselected = runner.invoke(app, ["pending", "retry-now"], env=env)
    text = runner.invoke(app, ["pending"], env=env)

    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.stdout)["totals"] == {"due": 3, "inflight": 1, "total": 4}
    assert dropped.exit_code == 0, dropped.output
    assert json.loads(dropped.stdout) | {"at": 0} == {
        "action": "drop",
        "by": "dan",
        "at": 0,
        "done": [f"{dlq}/0/1"],
        "in_flight": [],
        "missing": [],
        "failed": {},
        "ok": True,
    }
    assert parked.exit_code == 0, parked.output
    assert json.loads(parked.stdout)["done"] == [f"{dlq}/0/2"]
    assert refused.exit_code == 1 and "in flight" in refused.stdout
    assert unselected.exit_code == 1 and "no entries selected" in unselected.output
    assert text.exit_code == 0 and "2 pending (1 due, 1 in flight)" in " ".join(text.stdout.split())


def test_pending_commands_take_the_handler_redis_and_kafka_from_the_config_file(
    redis_url, kafka_bootstrap, new_topic, unique_name, tmp_path
):
    name, other = unique_name("cfg"), unique_name("other")
    dlq = new_topic(1, None, "cfg.dlq")
    create_topics(kafka_bootstrap, {f"{dlq}.poison": 1})

    async def given() -> None:
        async with RedisSchedule(redis_url, name) as s:
            await s.add((entry(dlq, i), now_ms() + HOUR_MS) for i in range(3))

    asyncio.run(given())
    path = tmp_path / "billing.toml"
    path.write_text(
        f'name = "{name}"\ntopics = ["{dlq}"]\nbootstrap_servers = "{kafka_bootstrap}"\nredis_url = "{redis_url}"\n'
    )
    clean = dict.fromkeys(["KAFKA_DLQ_CONFIG", "KAFKA_DLQ_REDIS_URL", "KAFKA_DLQ_NAME", "KAFKA_DLQ_BOOTSTRAP_SERVERS"])
    runner = CliRunner()

    listing = runner.invoke(app, ["pending", "--config", str(path), "--json"], env=clean)
    parked = runner.invoke(  # the file given before the subcommand, as --name may be; Kafka from it too
        app, ["pending", "--config", str(path), "park", "--id", f"{dlq}/0/1", "--json"], env=clean
    )
    dropped = runner.invoke(
        app, ["pending", "drop", "--id", f"{dlq}/0/2", "--json"], env={**clean, "KAFKA_DLQ_CONFIG": str(path)}
    )
    flag_wins = runner.invoke(app, ["pending", "-c", str(path), "--name", other, "--json"], env=clean)
    env_wins = runner.invoke(app, ["pending", "-c", str(path), "--json"], env={**clean, "KAFKA_DLQ_NAME": other})
    after = runner.invoke(app, ["pending", "-c", str(path), "--json"], env=clean)

    assert listing.exit_code == 0, listing.output
    assert json.loads(listing.stdout)["totals"]["total"] == 3
    assert parked.exit_code == 0, parked.output
    assert json.loads(parked.stdout)["done"] == [f"{dlq}/0/1"]
    assert dropped.exit_code == 0 and json.loads(dropped.stdout)["done"] == [f"{dlq}/0/2"]
    for result in (flag_wins, env_wins):  # another handler's schedule: empty
        assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["total"] == 0
    assert json.loads(after.stdout)["totals"]["total"] == 1
