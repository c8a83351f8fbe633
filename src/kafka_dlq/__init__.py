"""kafka-dlq: dead-letter queues for Apache Kafka in Python and asyncio."""

from kafka_dlq.errors import ConfigError, KafkaDLQError, ServerError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "KafkaDLQError",
    "ServerError",
    "__version__",
]
