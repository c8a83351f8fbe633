"""A server started for tests ends with the process that started it; the dev stack's outlives it on purpose."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from kafka_dlq.testing import RedisServer
from kafka_dlq.testing.servers import pid_alive, redis_pings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a parent-death signal is Linux's")

_STARTER = textwrap.dedent(
    """
    import sys, time
    from kafka_dlq.testing import RedisServer
    server = RedisServer(data_dir=sys.argv[1], outlive_parent=sys.argv[2] == "outlive").start()
    print(server.process.pid, server.port, flush=True)
    time.sleep(600)
    """
)


@contextlib.contextmanager
def _started_in_a_child(tmp_path, mode: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A Python process that starts a Redis server, says its pid and port, and waits to be killed; both end after."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STARTER, str(tmp_path / "redis"), mode], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    pid = 0
    try:
        line = child.stdout.readline()
        assert line, f"the starter printed nothing (exit code {child.poll()})"
        pid, port = (int(word) for word in line.split())
        yield child, pid, port
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_server_stops_when_the_process_that_started_it_is_killed(tmp_path):
    with _started_in_a_child(tmp_path, "stop") as (child, pid, port):
        assert redis_pings(port)
        child.send_signal(signal.SIGKILL)  # no cleanup runs: no finally, no atexit
        child.wait(10)

        assert _gone_within(pid, 30), f"redis-server {pid} outlived the killed process that started it"


def test_a_server_made_to_outlive_its_parent_goes_on_after_it_is_killed(tmp_path):
    with _started_in_a_child(tmp_path, "outlive") as (child, pid, port):
        child.send_signal(signal.SIGKILL)
        child.wait(10)

        assert not _gone_within(pid, 2), "the server ended with its parent although it was made to outlive it"
        assert redis_pings(port)


def test_a_server_started_from_a_thread_that_ends_goes_on_running(tmp_path):
    # Linux sends the parent-death signal when the *thread* that started a child ends: a server started from
    # asyncio.to_thread or any short-lived thread must not stop with it, only with the process.
    server = RedisServer(data_dir=tmp_path / "redis")
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join(30)
    try:
        assert server.running
        pid = server.process.pid
        assert pid is not None

        assert not _gone_within(pid, 2), "the server ended with the thread that started it"
        assert redis_pings(server.port)
    finally:
        server.stop()
