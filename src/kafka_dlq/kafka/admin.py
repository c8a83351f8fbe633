"""Blocking admin helpers: topic creation and broker readiness.

These wait on the network, so they are for set-up code, tests' fixtures and the CLI, never for the event loop;
async code runs them in a thread (``await asyncio.to_thread(create_topics, ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from kafka_dlq.errors import KafkaDLQError

__all__ = ["broker_answers", "create_topics", "delete_topics"]


def _admin(bootstrap_servers: str) -> AdminClient:
    # log_level 3 keeps librdkafka quiet about brokers that are not up yet; readiness is our question to answer.
    return AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 3})


def broker_answers(bootstrap_servers: str, timeout: float = 2.0) -> bool:
    """True when a broker at ``bootstrap_servers`` answers a metadata request within ``timeout`` seconds."""
    try:
        metadata = _admin(bootstrap_servers).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    config: Mapping[str, str] | None = None,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create each topic of ``topics`` (name to partition count); a topic that already exists is left as it is."""
    admin = _admin(bootstrap_servers)
    new = [
        NewTopic(name, num_partitions=partitions, replication_factor=replication_factor, config=dict(config or {}))
        for name, partitions in topics.items()
    ]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise KafkaDLQError(f"could not create topic {name!r} on {bootstrap_servers}: {exc}") from exc


def delete_topics(bootstrap_servers: str, names: list[str], *, timeout: float = 30.0) -> None:
    """Delete topics; a topic that does not exist is ignored."""
    admin = _admin(bootstrap_servers)
    for name, future in admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise KafkaDLQError(f"could not delete topic {name!r} on {bootstrap_servers}: {exc}") from exc
