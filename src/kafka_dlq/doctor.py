"""``kafka-dlq doctor``: is everything the handler relies on in place? Each check says what is wrong and the fix.

Checks, in order (later ones are skipped when what they need is unreachable):

1. Kafka: a broker answers; the cluster's brokers and controller.
2. Each dead-letter topic and its poison topic: they exist; partitions, replication (against ``min.insync.replicas``
   and the broker count), under-replicated partitions, compaction, and whether a dead letter fits the poison topic.
3. Consumer groups (the handler's, ``kafka-dlq-<name>`` unless given, and any others): state, members, lag.
4. Redis: it answers; AOF persistence on and writing, ``appendfsync``, eviction policy, WAITAOF (7.2+).
5. The handler's schedule: pending entries, expired leases and overdue retries (are handlers running?).

An ``error`` is something that loses records or stops the handler; a ``warn`` is a risk or a sign worth a look.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from redis.exceptions import RedisError

from kafka_dlq.errors import KafkaDLQError
from kafka_dlq.kafka.inspect import (
    TopicInfo,
    committed_offsets,
    describe_cluster,
    describe_group,
    describe_topics,
    end_offsets,
)
from kafka_dlq.schedule import RedisSchedule, connect_redis

__all__ = ["Check", "DoctorReport", "Status", "run_doctor"]

OVERDUE_MS = 60_000
"""A due retry not claimed this long after its time means no handler is claiming."""


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(kw_only=True)
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return all(check.status is not Status.ERROR for check in self.checks)

    def add(self, name: str, status: Status, detail: str, fix: str | None = None) -> None:
        self.checks.append(Check(name=name, status=status, detail=detail, fix=fix))

    def to_json(self) -> dict[str, Any]:
        counts = {status.value: sum(c.status is status for c in self.checks) for status in Status}
        return {"ok": self.ok, "counts": counts, "checks": [asdict(check) for check in self.checks]}


async def run_doctor(
    *,
    kafka_config: Mapping[str, Any] | None,
    redis_url: str | None,
    name: str | None = None,
    topics: Sequence[str] = (),
    poison_topic: str | None = None,
    groups: Sequence[str] = (),
    timeout: float = 10.0,
) -> DoctorReport:
    """Run every check that the settings given allow; never raises for what it finds.

    >>> report = await run_doctor(kafka_config={"bootstrap.servers": "127.0.0.1:19092"},   # doctest: +SKIP
    ...                           redis_url="redis://127.0.0.1:16379/0", name="billing", topics=["payments.dlq"])
    >>> [(c.name, c.status.value) for c in report.checks if c.status != "ok"]               # doctest: +SKIP
    [('redis.persistence', 'error')]
    """
    report = DoctorReport()
    group_ids = list(dict.fromkeys([*([f"kafka-dlq-{name}"] if name and not groups else []), *groups]))
    if kafka_config and kafka_config.get("bootstrap.servers"):
        brokers = await _brokers(report, kafka_config, timeout)
        if brokers:
            infos = await _topics(report, kafka_config, topics, poison_topic, brokers, timeout)
            for group_id in group_ids:
                await _group(report, kafka_config, group_id, infos, timeout)
    else:
        report.add(
            "kafka",
            Status.ERROR,
            "no Kafka bootstrap servers given",
            "pass --bootstrap or set KAFKA_DLQ_BOOTSTRAP_SERVERS",
        )
    if redis_url:
        if await _redis(report, redis_url, timeout) and name:
            await _schedule(report, redis_url, name)
    else:
        report.add("redis", Status.ERROR, "no Redis URL given", "pass --redis-url or set KAFKA_DLQ_REDIS_URL")
    return report


# ---------------------------------------------------------------- Kafka


async def _brokers(report: DoctorReport, config: Mapping[str, Any], timeout: float) -> int:
    """How many brokers the cluster has (0: none answered)."""
    servers = config["bootstrap.servers"]
    try:
        cluster = await asyncio.to_thread(describe_cluster, config, timeout)
    except KafkaDLQError as exc:
        report.add(
            "kafka.brokers",
            Status.ERROR,
            f"no broker at {servers} answered: {exc}",
            "check --bootstrap / KAFKA_DLQ_BOOTSTRAP_SERVERS, that the brokers run and that this host reaches them "
            "(for a local stack: kafka-dlq dev up)",
        )
        return 0
    report.add(
        "kafka.brokers",
        Status.OK,
        f"{len(cluster.brokers)} broker(s) ({', '.join(cluster.brokers)}), controller {cluster.controller}, "
        f"cluster {cluster.cluster_id}",
    )
    return max(1, len(cluster.brokers))


async def _topics(
    report: DoctorReport,
    config: Mapping[str, Any],
    topics: Sequence[str],
    poison_topic: str | None,
    brokers: int,
    timeout: float,
) -> dict[str, TopicInfo | None]:
    if not topics:
        report.add(
            "kafka.topics",
            Status.WARN,
            "no dead-letter topics given: topic checks skipped",
            "pass --topic (repeatable) or set KAFKA_DLQ_TOPICS",
        )
        return {}
    poison_of = {topic: poison_topic or f"{topic}.poison" for topic in topics}
    names = list(dict.fromkeys([*topics, *poison_of.values()]))
    try:
        infos = await asyncio.to_thread(describe_topics, config, names, timeout)
    except KafkaDLQError as exc:
        report.add("kafka.topics", Status.ERROR, f"could not describe the topics: {exc}", "check the ACLs")
        return {}
    servers = config["bootstrap.servers"]
    for topic in topics:
        dlq, parked = infos[topic], infos[poison_of[topic]]
        _topic(report, f"topic {topic}", topic, dlq, brokers, servers, "the handler consumes it")
        poison = poison_of[topic]
        partitions = dlq.partitions if dlq is not None else 6
        _topic(
            report, f"poison topic {poison}", poison, parked, brokers, servers, "the handler parks there", partitions
        )
        if dlq is not None and parked is not None:
            dlq_max = int(dlq.settings.get("max.message.bytes", "0") or 0)
            poison_max = int(parked.settings.get("max.message.bytes", "0") or 0)
            if dlq_max and poison_max and poison_max < dlq_max:
                report.add(
                    f"poison topic {poison}",
                    Status.WARN,
                    f"max.message.bytes {poison_max} is below {topic}'s {dlq_max}: a large dead letter is parked "
                    "without its value",
                    f"kafka-configs.sh --bootstrap-server {servers} --alter --entity-type topics --entity-name "
                    f"{poison} --add-config max.message.bytes={dlq_max}",
                )
    return infos


def _topic(
    report: DoctorReport,
    check: str,
    topic: str,
    info: TopicInfo | None,
    brokers: int,
    servers: str,
    role: str,
    partitions: int = 6,
) -> None:
    if info is None:
        report.add(
            check,
            Status.ERROR,
            f"does not exist ({role})",
            f"kafka-topics.sh --bootstrap-server {servers} --create --topic {topic} --partitions {partitions} "
            f"--replication-factor {min(3, brokers)}",
        )
        return
    detail = f"{info.partitions} partition(s), replication factor {info.replication_factor}"
    if info.settings.get("retention.ms"):
        retention = int(info.settings["retention.ms"])
        detail += ", retention " + ("forever" if retention < 0 else f"{retention / 86_400_000:g} day(s)")
    min_isr = int(info.settings.get("min.insync.replicas", "1") or 1)
    if info.replication_factor < min_isr:
        report.add(
            check,
            Status.ERROR,
            f"{detail}: fewer replicas than min.insync.replicas={min_isr}, so every write with acks=all fails",
            f"kafka-configs.sh --bootstrap-server {servers} --alter --entity-type topics --entity-name {topic} "
            f"--add-config min.insync.replicas={info.replication_factor} (or add replicas)",
        )
    elif info.under_replicated:
        report.add(
            check,
            Status.WARN,
            f"{detail}: {info.under_replicated} partition(s) under-replicated",
            "check the brokers: one is down or behind",
        )
    elif info.replication_factor == 1 and brokers > 1:
        report.add(
            check,
            Status.WARN,
            f"{detail}: one copy only, so losing a broker loses dead letters",
            "raise the replication factor with kafka-reassign-partitions.sh",
        )
    elif "compact" in info.settings.get("cleanup.policy", ""):
        report.add(
            check,
            Status.WARN,
            f"{detail}: cleanup.policy is compact, so dead letters with equal keys replace each other",
            f"kafka-configs.sh --bootstrap-server {servers} --alter --entity-type topics --entity-name {topic} "
            "--add-config cleanup.policy=delete",
        )
    else:
        report.add(check, Status.OK, detail)


async def _group(
    report: DoctorReport,
    config: Mapping[str, Any],
    group_id: str,
    infos: Mapping[str, TopicInfo | None],
    timeout: float,
) -> None:
    check = f"group {group_id}"
    try:
        group = await asyncio.to_thread(describe_group, config, group_id, timeout)
        partitions = [(t, p) for t, info in infos.items() if info is not None for p in range(info.partitions)]
        committed = await asyncio.to_thread(committed_offsets, config, group_id, None, timeout)
        mine = [tp for tp in partitions if tp in committed]
        ends = await asyncio.to_thread(end_offsets, config, mine, timeout) if mine else {}
    except KafkaDLQError as exc:
        report.add(check, Status.ERROR, f"could not describe the group: {exc}", "check the ACLs on the group")
        return
    lag = sum(max(0, ends[tp] - committed[tp]) for tp in mine)
    where = sorted({t for t, _ in committed})
    detail = f"state {group.state}, {group.members} member(s)"
    if where:
        detail += f", committed on {', '.join(where)}"
    if mine:
        detail += f", lag {lag} record(s) on the topics checked"
    if group.state == "dead":
        report.add(
            check,
            Status.WARN,
            "does not exist: no handler has run with it yet",
            "start the handler (kafka-dlq run), or give its group with --group",
        )
    elif group.members == 0:
        report.add(check, Status.WARN, f"{detail}: no member, so nothing consumes", "start the handler (kafka-dlq run)")
    else:
        report.add(check, Status.OK, detail)


# ---------------------------------------------------------------- Redis


async def _redis(report: DoctorReport, url: str, timeout: float) -> bool:
    client = connect_redis(url, max_connections=2)
    try:
        try:
            await asyncio.wait_for(client.ping(), timeout)
            server = await client.info("server")
            persistence = await client.info("persistence")
            memory = await client.info("memory")
        except (RedisError, OSError, TimeoutError) as exc:
            report.add(
                "redis",
                Status.ERROR,
                f"Redis at {url} did not answer: {exc or 'timed out'}",
                "check --redis-url / KAFKA_DLQ_REDIS_URL and that Redis runs (for a local stack: kafka-dlq dev up)",
            )
            return False
        fsync = None
        # CONFIG is often disabled on managed Redis: the other checks still stand without it.
        with contextlib.suppress(RedisError):
            fsync = (await client.config_get("appendfsync")).get("appendfsync")
    finally:
        await client.aclose()
    version = str(server.get("redis_version", "?"))
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    report.add("redis", Status.OK, f"Redis {version} at {url} ({server.get('redis_mode', 'standalone')})")
    cli = f"redis-cli -u {url}"
    if not persistence.get("aof_enabled"):
        report.add(
            "redis.persistence",
            Status.ERROR,
            "AOF persistence is off: a Redis restart loses the retry schedule (records still pending are lost)",
            f"{cli} CONFIG SET appendonly yes && {cli} CONFIG REWRITE (or appendonly yes in redis.conf)",
        )
    elif (
        persistence.get("aof_last_write_status", "ok") != "ok"
        or persistence.get("aof_last_bgrewrite_status", "ok") != "ok"
    ):
        report.add(
            "redis.persistence",
            Status.ERROR,
            f"AOF is on but failing (last write {persistence.get('aof_last_write_status')}, last rewrite "
            f"{persistence.get('aof_last_bgrewrite_status')})",
            "check the Redis log and its disk (space, permissions)",
        )
    elif fsync == "no":
        report.add(
            "redis.persistence",
            Status.WARN,
            "AOF is on with appendfsync no: the OS decides when writes reach the disk",
            f"{cli} CONFIG SET appendfsync everysec",
        )
    elif major_minor and major_minor < (7, 2):
        report.add(
            "redis.persistence",
            Status.WARN,
            f"AOF is on, but Redis {version} has no WAITAOF: the handler cannot wait for its writes to reach disk",
            "upgrade Redis to 7.2 or later",
        )
    else:
        report.add("redis.persistence", Status.OK, f"AOF on (appendfsync {fsync or 'unknown'}), WAITAOF available")
    policy = str(memory.get("maxmemory_policy", "noeviction"))
    limit = int(memory.get("maxmemory", 0) or 0)
    if limit and policy != "noeviction":
        report.add(
            "redis.memory",
            Status.ERROR,
            f"maxmemory {limit} bytes with policy {policy}: under memory pressure Redis evicts schedule keys",
            f"{cli} CONFIG SET maxmemory-policy noeviction",
        )
    else:
        used = memory.get("used_memory_human", "?")
        report.add(
            "redis.memory",
            Status.OK,
            f"{used} used, " + (f"limit {limit} bytes, " if limit else "no limit, ") + f"policy {policy}",
        )
    return True


async def _schedule(report: DoctorReport, url: str, name: str) -> None:
    keys = RedisSchedule(url, name).keys
    client = connect_redis(url, max_connections=2)
    now = int(time.time() * 1000)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.zcard(keys["due"])
        pipe.zcard(keys["inflight"])
        pipe.zcount(keys["inflight"], "-inf", now)
        pipe.zcount(keys["due"], "-inf", now - OVERDUE_MS)
        due, inflight, expired, overdue = (int(n) for n in await pipe.execute())
    except RedisError as exc:
        report.add(f"schedule {name}", Status.ERROR, f"could not read the schedule: {exc}")
        return
    finally:
        await client.aclose()
    detail = f"{due} due, {inflight} in flight"
    if expired or overdue:
        report.add(
            f"schedule {name}",
            Status.WARN,
            f"{detail}; {expired} lease(s) expired, {overdue} retries overdue by over a minute: no handler "
            "instance seems to be claiming",
            f"start the handler (kafka-dlq run); `kafka-dlq pending --name {name}` lists the entries",
        )
    else:
        report.add(f"schedule {name}", Status.OK, detail)
