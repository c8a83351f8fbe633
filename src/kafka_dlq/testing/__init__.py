"""Real Kafka and Redis servers for tests and local development, and pytest fixtures over them.

``kafka_dlq.testing.pytest_plugin`` has the fixtures; :class:`KafkaServer` and :class:`RedisServer` can be used on
their own, as context managers.
"""

from kafka_dlq.testing.memory import MemoryRetryingConsumer
from kafka_dlq.testing.servers import (
    KAFKA_VERSION,
    KafkaServer,
    RedisServer,
    cache_dir,
    ensure_kafka_libs,
    free_port,
    free_ports,
)

__all__ = [
    "KAFKA_VERSION",
    "KafkaServer",
    "MemoryRetryingConsumer",
    "RedisServer",
    "cache_dir",
    "ensure_kafka_libs",
    "free_port",
    "free_ports",
]
