"""Blocking admin helpers: topic creation and broker readiness.

These wait on the network, so they are for set-up code, tests' fixtures and the CLI, never for the event loop;
async code runs them in a thread (``await asyncio.to_thread(create_topics, ...)``).
"""

from __future__ import annotations

import time
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
    _wait_until_served(admin, bootstrap_servers, topics, timeout)


def _wait_until_served(admin: AdminClient, bootstrap_servers: str, topics: Mapping[str, int], timeout: float) -> None:
    """Return once the broker's metadata has every topic with a leader for each of its partitions.

    The controller says a topic exists a little before the broker serves it: a client that looks it up at once
    (a producer's or consumer's start-up check) may otherwise hear "unknown topic" for a topic just made.
    """
    deadline = time.monotonic() + timeout
    waiting = set(topics)
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        except KafkaException:
            metadata = None
        if metadata is not None:
            for name in list(waiting):
                found = metadata.topics.get(name)
                if (
                    found is not None
                    and found.error is None
                    and found.partitions  # an existing topic may have another count than asked: any will do
                    and all(p.leader >= 0 and p.error is None for p in found.partitions.values())
                ):
                    waiting.discard(name)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise KafkaDLQError(
                f"topics {sorted(waiting)} were created on {bootstrap_servers} but not served within {timeout:.0f} s: "
                "check the broker's log"
            )
        time.sleep(0.05)


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
