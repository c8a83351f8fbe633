"""Blocking admin look-ups for the operator tools: the cluster, topics and their settings, groups and offsets.

Like ``admin.py`` these wait on the network: async code runs them in a thread
(``await asyncio.to_thread(describe_topics, config, ["orders.dlq"])``). ``config`` is a librdkafka configuration
with at least ``bootstrap.servers`` (security settings pass through). Errors come back as the project's own
(``BrokerUnreachableError`` when no broker answers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, OffsetSpec, ResourceType  # type: ignore[attr-defined]

from kafka_dlq.errors import KafkaClientError
from kafka_dlq.kafka._thread import librdkafka_log, translate

__all__ = [
    "ClusterInfo",
    "GroupInfo",
    "TopicInfo",
    "committed_offsets",
    "describe_cluster",
    "describe_group",
    "describe_topics",
    "end_offsets",
]

TP = tuple[str, int]

TOPIC_SETTINGS = ("cleanup.policy", "max.message.bytes", "min.insync.replicas", "retention.ms")
"""The topic settings ``describe_topics`` reports: the ones that decide whether dead letters are kept."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterInfo:
    cluster_id: str | None
    controller: int | None
    brokers: list[str]
    """``id host:port`` of each broker."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicInfo:
    name: str
    partitions: int
    replication_factor: int
    """The smallest replica count of any partition."""
    under_replicated: int
    """Partitions with fewer in-sync replicas than replicas."""
    settings: dict[str, str] = field(default_factory=dict)
    """The values of ``TOPIC_SETTINGS`` (as the broker reports them; absent when it did not say)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupInfo:
    group_id: str
    state: str
    """``stable``, ``empty``, ``preparing_rebalance``, ``completing_rebalance``, ``dead`` (no such group) ..."""
    members: int
    topics: list[str]
    """Topics assigned to its members now."""


def _admin(config: Mapping[str, Any]) -> AdminClient:
    settings: dict[str, Any] = {"logger": librdkafka_log, **config}
    return AdminClient(settings)


def _where(config: Mapping[str, Any]) -> str:
    return str(config.get("bootstrap.servers", "<no bootstrap.servers>"))


def _error(exc: BaseException, context: str) -> KafkaClientError:
    translated = translate(exc, context)
    if isinstance(translated, KafkaClientError):
        return translated
    return KafkaClientError(str(translated))


def describe_cluster(config: Mapping[str, Any], timeout: float = 10.0) -> ClusterInfo:
    """The cluster's id, controller and brokers; ``BrokerUnreachableError`` when none answers within ``timeout``."""
    admin = _admin(config)
    try:
        found = admin.describe_cluster(request_timeout=timeout).result(timeout=timeout + 5)
    except KafkaException as exc:
        raise _error(exc, f"no broker at {_where(config)} answered") from None
    controller = found.controller
    return ClusterInfo(
        cluster_id=found.cluster_id,
        controller=None if controller is None else controller.id,
        brokers=[f"{node.id} {node.host}:{node.port}" for node in found.nodes],
    )


def describe_topics(
    config: Mapping[str, Any], names: Sequence[str], timeout: float = 10.0
) -> dict[str, TopicInfo | None]:
    """Each topic's partitions, replication and retention settings; None for a topic that does not exist."""
    if not names:
        return {}
    admin = _admin(config)
    out: dict[str, TopicInfo | None] = {}
    described = {}
    for name, future in admin.describe_topics(TopicCollection(list(names)), request_timeout=timeout).items():
        try:
            described[name] = future.result(timeout=timeout + 5)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                out[name] = None
                continue
            raise _error(exc, f"describing topic {name!r}") from None
    settings: dict[str, dict[str, str]] = {name: {} for name in described}
    if described:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in described]
        for resource, future in admin.describe_configs(resources, request_timeout=timeout).items():
            try:
                entries = future.result(timeout=timeout + 5)
            except KafkaException:
                continue  # not allowed to read settings (ACLs): report the topic without them
            settings[resource.name] = {
                key: str(entry.value) for key, entry in entries.items() if key in TOPIC_SETTINGS and entry.value
            }
    for name, description in described.items():
        partitions = description.partitions
        out[name] = TopicInfo(
            name=name,
            partitions=len(partitions),
            replication_factor=min((len(p.replicas) for p in partitions), default=0),
            under_replicated=sum(1 for p in partitions if len(p.isr) < len(p.replicas)),
            settings=settings[name],
        )
    return {name: out[name] for name in names}


def describe_group(config: Mapping[str, Any], group_id: str, timeout: float = 10.0) -> GroupInfo:
    """A consumer group's state and members; a group that does not exist comes back in state ``dead``."""
    admin = _admin(config)
    try:
        found = admin.describe_consumer_groups([group_id], request_timeout=timeout)[group_id].result(
            timeout=timeout + 5
        )
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and error.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return GroupInfo(group_id=group_id, state="dead", members=0, topics=[])
        raise _error(exc, f"describing consumer group {group_id!r}") from None
    topics = sorted(
        {tp.topic for member in found.members if member.assignment for tp in member.assignment.topic_partitions}
    )
    state = getattr(found.state, "name", str(found.state)).lower()
    return GroupInfo(group_id=group_id, state=state, members=len(found.members), topics=topics)


def committed_offsets(
    config: Mapping[str, Any], group_id: str, partitions: Iterable[TP] | None = None, timeout: float = 10.0
) -> dict[TP, int]:
    """The offsets ``group_id`` committed: for ``partitions`` (or all it has); a partition never committed is left
    out."""
    admin = _admin(config)
    asked = None if partitions is None else [TopicPartition(t, p) for t, p in partitions]
    request = ConsumerGroupTopicPartitions(group_id, asked)
    try:
        found = admin.list_consumer_group_offsets([request], request_timeout=timeout)[group_id].result(
            timeout=timeout + 5
        )
    except KafkaException as exc:
        raise _error(exc, f"committed offsets of group {group_id!r}") from None
    return {(tp.topic, tp.partition): tp.offset for tp in found.topic_partitions or () if tp.offset >= 0}


def end_offsets(config: Mapping[str, Any], partitions: Iterable[TP], timeout: float = 10.0) -> dict[TP, int]:
    """Each partition's high watermark (one past its last record)."""
    asked = {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions}  # type: ignore[no-untyped-call]
    if not asked:
        return {}
    admin = _admin(config)
    out = {}
    for tp, future in admin.list_offsets(asked, request_timeout=timeout).items():
        try:
            out[(tp.topic, tp.partition)] = future.result(timeout=timeout + 5).offset
        except KafkaException as exc:
            raise _error(exc, f"end offset of {tp.topic}/{tp.partition}") from None
    return out
