"""``doctor``: finds what is wrong with the brokers, topics, groups and Redis, and says how to fix it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from kafka_dlq.cli import app
from kafka_dlq.doctor import Status, run_doctor
from kafka_dlq.kafka import AsyncConsumer
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.records import DeadLetter, DlqCoordinates, OriginalRecord
from kafka_dlq.schedule import Entry, RedisSchedule, connect_redis
from kafka_dlq.testing import RedisServer, free_port
from tests.conftest import wait_for
from tests.helpers import seed
from tests.test_handler import dead_letter


@pytest.fixture
def careless_redis(tmp_path):
    """A Redis as it comes out of many boxes: no AOF, and an eviction policy that may drop the schedule."""
    server = RedisServer(data_dir=tmp_path / "redis", extra_args=["--maxmemory", "64mb"])
    server.start()
    yield server.url
    server.stop()


def statuses(report) -> dict[str, str]:
    return {check.name: check.status.value for check in report.checks}


async def test_a_healthy_setup_passes_and_reports_the_group_and_schedule(
    kafka_bootstrap, redis_url, new_topic, unique_name
):
    name = unique_name("doc")
    dlq = await asyncio.to_thread(new_topic, 2, None, "doc.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter("orders", b"k", b"v") for _ in range(4)])
    async with RedisSchedule(redis_url, name) as schedule:
        dl = DeadLetter(original=OriginalRecord(topic="orders"), dlq=DlqCoordinates(topic=dlq, partition=0, offset=0))
        await schedule.add([(Entry(dead_letter=dl), int(time.time() * 1000) - 120_000)])  # overdue: nobody claims
    assigned: list[tuple[str, int]] = []
    member = AsyncConsumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": f"kafka-dlq-{name}"}, [dlq], on_assign=assigned.extend
    )
    async with member:  # stands in for a running handler: a member of the handler's group
        await wait_for(lambda: bool(assigned), 30, "the group to assign its member")
        report = await run_doctor(
            kafka_config={"bootstrap.servers": kafka_bootstrap}, redis_url=redis_url, name=name, topics=[dlq]
        )

    found = statuses(report)
    print("\n" + "\n".join(f"{c.status.value:5} {c.name}: {c.detail}" for c in report.checks))
    assert report.ok
    assert found["kafka.brokers"] == "ok"
    assert found[f"topic {dlq}"] == "ok"
    assert found[f"poison topic {dlq}.poison"] == "ok"
    assert found[f"group kafka-dlq-{name}"] == "ok"
    assert found["redis"] == "ok"
    assert found["redis.memory"] == "ok"
    assert found["redis.persistence"] in ("ok", "warn")  # warn on Redis before 7.2 (no WAITAOF)
    assert found[f"schedule {name}"] == "warn"  # an overdue retry: no handler claims
    detail = next(c.detail for c in report.checks if c.name == f"group kafka-dlq-{name}")
    assert "1 member(s)" in detail


async def test_missing_poison_topic_and_careless_redis_are_errors_with_fixes(
    kafka_bootstrap, new_topic, careless_redis
):
    dlq = await asyncio.to_thread(new_topic, 1, None, "doc.dlq")
    client_settings = {"bootstrap.servers": kafka_bootstrap}
    client = connect_redis(careless_redis)
    await client.config_set("maxmemory-policy", "allkeys-lru")
    await client.aclose()

    report = await run_doctor(kafka_config=client_settings, redis_url=careless_redis, topics=[dlq])

    assert not report.ok
    errors = {c.name: c for c in report.checks if c.status is Status.ERROR}
    assert set(errors) == {f"poison topic {dlq}.poison", "redis.persistence", "redis.memory"}
    assert "--create --topic " + f"{dlq}.poison" in (errors[f"poison topic {dlq}.poison"].fix or "")
    assert "CONFIG SET appendonly yes" in (errors["redis.persistence"].fix or "")
    assert "maxmemory-policy noeviction" in (errors["redis.memory"].fix or "")


def test_doctor_command_exits_non_zero_and_says_what_to_do_when_nothing_answers():
    env = {
        "KAFKA_DLQ_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "KAFKA_DLQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }

    text = CliRunner().invoke(app, ["doctor", "--timeout", "2"], env=env)
    as_json = CliRunner().invoke(app, ["doctor", "--timeout", "2", "--json"], env=env)

    assert text.exit_code == 1
    flat = " ".join(text.stdout.split())
    assert "kafka.brokers: no broker at" in flat and "fix: check --bootstrap" in flat
    assert "fix: check --redis-url" in flat
    data = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and data["ok"] is False
    assert {c["name"]: c["status"] for c in data["checks"]} == {"kafka.brokers": "error", "redis": "error"}


def test_doctor_command_reads_the_handlers_config_file(tmp_path, kafka_bootstrap, redis_url, new_topic):
    dlq = new_topic(1, None, "doc.dlq")
    create_topics(kafka_bootstrap, {f"{dlq}.poison": 1})
    config = tmp_path / "handler.toml"
    config.write_text(
        f'name = "docfile"\ntopics = ["{dlq}"]\nbootstrap_servers = "{kafka_bootstrap}"\nredis_url = "{redis_url}"\n'
        '[processors]\norders = "no.such.module:fn"\n'
    )

    result = CliRunner().invoke(app, ["doctor", "--config", str(config), "--json"])

    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert result.exit_code == 1
    assert checks["config"]["status"] == "error" and "no.such.module" in checks["config"]["detail"]
