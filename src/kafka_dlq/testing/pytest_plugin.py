"""pytest fixtures for a real Kafka broker and a real Redis server, shared by the whole test session.

Enable with ``-p kafka_dlq.testing.pytest_plugin`` (or ``pytest_plugins = ["kafka_dlq.testing.pytest_plugin"]`` in a
top-level conftest). Servers start on first use, on free loopback ports, in temporary folders. When the session ends
they are stopped; their folders are removed, unless a test failed: then the logs stay and the summary says where.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.testing.servers import KafkaServer, RedisServer

_MiB = 1024 * 1024
_SESSION_DIR = pytest.StashKey[Path]()
_REPORT = pytest.StashKey[list[str]]()
_FAILED_SEEN: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED_SEEN.append(report.nodeid)


def _report(config: pytest.Config, line: str) -> None:
    config.stash[_REPORT].append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[kafka-dlq] {line}")


def _session_dir(config: pytest.Config) -> Path:
    if _SESSION_DIR not in config.stash:
        config.stash[_SESSION_DIR] = Path(tempfile.mkdtemp(prefix="kafka-dlq-tests-"))
    return config.stash[_SESSION_DIR]


def _mib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / _MiB:.0f} MiB"


@pytest.fixture(scope="session")
def kafka_server(request: pytest.FixtureRequest) -> Iterator[KafkaServer]:
    """A one-node Kafka broker for the whole session."""
    config = request.config
    server = KafkaServer(data_dir=_session_dir(config) / "kafka")
    server.start()
    # Formatting the log folder runs a JVM of its own before the broker's: both count for a test run's wait.
    formatted = "" if server.format_seconds is None else f" (format {server.format_seconds:.1f} s)"
    _report(
        config,
        f"Kafka {server.version} started at {server.bootstrap_servers}: ready in {server.ready_seconds:.1f} s"
        f"{formatted}, resident memory {_mib(server.rss_bytes())}",
    )
    yield server
    server.stop()
    _report(config, f"Kafka {server.version} stopped")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A Redis server for the whole session (AOF on, as the handler's durability expects)."""
    config = request.config
    server = RedisServer(data_dir=_session_dir(config) / "redis", appendonly=True)
    server.start()
    _report(config, f"Redis {server.version} started at {server.url}: ready in {server.ready_seconds:.1f} s")
    yield server
    server.stop()
    _report(config, f"Redis {server.version} stopped")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_server: KafkaServer) -> str:
    """``bootstrap.servers`` of the session's broker."""
    return kafka_server.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's Redis server."""
    return redis_server.url


_counter = itertools.count(1)


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``unique_name("orders")`` gives a name no other test uses: for topics, groups, handler names."""
    stem = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:60].strip("-")
    token = uuid.uuid4().hex[:8]

    def make(prefix: str) -> str:
        return f"{prefix}-{stem}-{token}-{next(_counter)}"

    return make


@pytest.fixture
def group_id(unique_name: Callable[[str], str]) -> str:
    """A consumer group name for this test only."""
    return unique_name("group")


TopicFactory = Callable[..., str]


@pytest.fixture
def new_topic(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> TopicFactory:
    """``new_topic(partitions=1, config=None, prefix="topic")`` creates a topic for this test and returns its name.

    It blocks while the broker creates the topic: call it from the test's set-up, or in an async test via
    ``await asyncio.to_thread(new_topic, ...)``.
    """

    def make(partitions: int = 1, config: Mapping[str, str] | None = None, prefix: str = "topic") -> str:
        name = unique_name(prefix)
        create_topics(kafka_bootstrap, {name: partitions}, config=config)
        return name

    return make


@pytest.fixture
def topic(new_topic: TopicFactory) -> str:
    """A fresh one-partition topic for this test."""
    return new_topic()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    folder = config.stash.get(_SESSION_DIR, None)
    if folder is None or not folder.exists():
        return
    if _FAILED_SEEN or os.environ.get("KAFKA_DLQ_KEEP_LOGS"):
        config.stash[_REPORT].append(f"server logs kept in {folder} (kafka/server.log, redis/server.log)")
    else:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("kafka-dlq test servers")
        for line in lines:
            terminalreporter.write_line(line)
