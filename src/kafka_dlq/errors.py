"""The project's exceptions: one root, setup errors that are also ``ValueError``."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "KafkaDLQError",
    "ServerError",
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
