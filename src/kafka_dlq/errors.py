"""The project's exceptions: one root, setup errors that are also ``ValueError``."""

from __future__ import annotations

__all__ = [
    "BrokerUnreachableError",
    "ClientClosedError",
    "ConfigError",
    "DeliveryError",
    "KafkaClientError",
    "KafkaDLQError",
    "RecordTooLargeError",
    "ServerError",
    "TopicNotFoundError",
]


class KafkaDLQError(Exception):
    """Root of every exception kafka-dlq raises on purpose."""


class ConfigError(KafkaDLQError, ValueError):
    """A setting is missing or wrong; the message names it and says how to fix it."""


class ServerError(KafkaDLQError):
    """A local Kafka or Redis server (``kafka_dlq.testing``) could not be set up, started or stopped.

    ``log_path`` names the server's log when there is one.
    """

    def __init__(self, message: str, *, log_path: str | None = None) -> None:
        if log_path is not None:
            message = f"{message} (server log: {log_path})"
        super().__init__(message)
        self.log_path = log_path


class KafkaClientError(KafkaDLQError):
    """A Kafka client operation failed.

    ``retriable``: trying again may work; ``fatal``: the client is unusable, make a new one; ``abortable``: the
    transaction must be aborted (then it may be tried again).
    """

    def __init__(self, message: str, *, code: str | None = None, retriable: bool = False, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable
        self.fatal = fatal
        self.abortable = False


class ClientClosedError(KafkaClientError):
    """The client was stopped; a stopped client is not started again: make a new one."""


class BrokerUnreachableError(KafkaClientError):
    """No broker answered at start-up within the connect timeout."""


class TopicNotFoundError(KafkaClientError):
    """A topic the client was asked to use does not exist (and the cluster does not create topics on demand)."""


class RecordTooLargeError(KafkaClientError):
    """A record is larger than the client's ``message.max.bytes`` or the topic's ``max.message.bytes``."""


class DeliveryError(KafkaClientError):
    """The broker did not take a record: its delivery report carried an error."""
