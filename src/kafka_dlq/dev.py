"""The local dev stack behind ``kafka-dlq dev up | down | status``: one Kafka and one Redis on fixed ports.

The servers outlive the command that starts them; their pids, ports and folders are kept in a small state file
in the cache folder, so ``status`` and ``down`` find them from another shell.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kafka_dlq.kafka.admin import broker_answers
from kafka_dlq.testing.servers import (
    KAFKA_VERSION,
    KafkaServer,
    RedisServer,
    cache_dir,
    command_line,
    redis_pings,
    terminate,
)

__all__ = ["DEFAULT_KAFKA_PORT", "DEFAULT_REDIS_PORT", "DevStack", "dev_down", "dev_status", "dev_up"]

# Off the well-known 9092/6379 so the dev stack never collides with a Kafka or Redis the user already runs.
DEFAULT_KAFKA_PORT = 19092
DEFAULT_CONTROLLER_PORT = 19093
DEFAULT_REDIS_PORT = 16379


@dataclass(frozen=True, kw_only=True)
class DevStack:
    kafka_pid: int
    kafka_port: int
    kafka_controller_port: int
    kafka_version: str
    redis_pid: int
    redis_port: int
    redis_version: str
    folder: str
    bootstrap: str | None = None
    """Set for servers that are not the dev stack's own (the demo pointed elsewhere)."""
    redis: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return self.redis or f"redis://127.0.0.1:{self.redis_port}/0"

    def settings(self) -> dict[str, Any]:
        """What a client needs, as ``KAFKA_DLQ_*`` environment variables use them."""
        return {"KAFKA_DLQ_BOOTSTRAP_SERVERS": self.bootstrap_servers, "KAFKA_DLQ_REDIS_URL": self.redis_url}


def _folder() -> Path:
    # KAFKA_DLQ_DEV_DIR lets tests (and a second stack) keep their own state apart from the user's.
    return Path(os.environ.get("KAFKA_DLQ_DEV_DIR") or cache_dir() / "dev")


def _state_file() -> Path:
    return _folder() / "state.json"


def _load() -> DevStack | None:
    try:
        return DevStack(**json.loads(_state_file().read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _kafka_is_ours(stack: DevStack) -> bool:
    # The pid must still be the broker this stack started: Kafka's main class, on this stack's config file.
    line = command_line(stack.kafka_pid)
    config = str(Path(stack.folder) / "kafka" / "server.properties")
    return line is not None and "kafka.Kafka" in line and config in line


def _redis_is_ours(stack: DevStack) -> bool:
    # redis-server renames itself "redis-server 127.0.0.1:PORT" once it runs; before that its argv has --port.
    line = command_line(stack.redis_pid)
    return (
        line is not None
        and "redis-server" in line
        and (f"127.0.0.1:{stack.redis_port}" in line or f"--port {stack.redis_port}" in line)
    )


def dev_status() -> dict[str, Any]:
    """Whether the dev stack runs, with its connection settings; never raises.

    ``stale`` is true when the state file names servers that are gone (a reboot, a crash): their pids may belong to
    other programs by now, which ``down`` leaves alone.
    """
    stack = _load()
    if stack is None:
        return {"running": False, "stale": False, "kafka": None, "redis": None}
    kafka_ours, redis_ours = _kafka_is_ours(stack), _redis_is_ours(stack)
    kafka_up = kafka_ours and broker_answers(stack.bootstrap_servers, timeout=2.0)
    redis_up = redis_ours and redis_pings(stack.redis_port)
    return {
        "running": kafka_up and redis_up,
        "stale": not kafka_ours and not redis_ours,
        "kafka": {
            "up": kafka_up,
            "stale": not kafka_ours,
            "version": stack.kafka_version,
            "bootstrap_servers": stack.bootstrap_servers,
            "pid": stack.kafka_pid,
            "log": str(Path(stack.folder) / "kafka" / "server.log"),
        },
        "redis": {
            "up": redis_up,
            "stale": not redis_ours,
            "version": stack.redis_version,
            "url": stack.redis_url,
            "pid": stack.redis_pid,
            "log": str(Path(stack.folder) / "redis" / "server.log"),
        },
        "settings": stack.settings(),
    }


def dev_up(
    *,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    controller_port: int = DEFAULT_CONTROLLER_PORT,
    redis_port: int = DEFAULT_REDIS_PORT,
) -> DevStack:
    """Start the dev stack, or return the one already running."""
    stack = _load()
    if stack is not None and dev_status()["running"]:
        return stack
    if stack is not None:
        dev_down()
    folder = _folder()
    # The stack runs on after this command ends: its servers outlive the process that starts them.
    kafka = KafkaServer(
        port=kafka_port, controller_port=controller_port, data_dir=folder / "kafka", outlive_parent=True
    )
    redis = RedisServer(port=redis_port, data_dir=folder / "redis", appendonly=True, outlive_parent=True)
    try:
        kafka.start()
        redis.start()
        assert kafka.process.pid is not None and redis.process.pid is not None
        stack = DevStack(
            kafka_pid=kafka.process.pid,
            kafka_port=kafka.port,
            kafka_controller_port=kafka.controller_port,
            kafka_version=KAFKA_VERSION,
            redis_pid=redis.process.pid,
            redis_port=redis.port,
            redis_version=redis.version or "unknown",
            folder=str(folder),
        )
        _state_file().write_text(json.dumps(asdict(stack), indent=2))
    except BaseException:
        # An error or Ctrl-C part-way: leave no server running that no state file names.
        _state_file().unlink(missing_ok=True)
        redis.stop()
        kafka.stop()
        raise
    kafka.process.detach()
    redis.process.detach()
    return stack


def dev_down(*, purge: bool = False) -> bool:
    """Stop the dev stack; ``purge`` also deletes its data. False when nothing was running."""
    stack = _load()
    if stack is not None:
        # Only a pid that is still the server we started gets signalled (its whole process group, at that).
        if _kafka_is_ours(stack):
            terminate(stack.kafka_pid)
        if _redis_is_ours(stack):
            terminate(stack.redis_pid)
        _state_file().unlink(missing_ok=True)
    if purge:
        shutil.rmtree(_folder(), ignore_errors=True)
    return stack is not None
