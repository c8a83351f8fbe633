"""`kafka-dlq dev up | status | down`: the local stack for a person at a shell."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kafka_dlq.testing import free_port


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kafka_dlq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def dev_env(tmp_path):
    env = dict(os.environ, KAFKA_DLQ_DEV_DIR=str(tmp_path / "dev"), COLUMNS="200")
    yield env
    _cli("dev", "down", "--purge", env=env)


def test_dev_up_status_down_round_trip(dev_env):
    kafka_port, redis_port = free_port(), free_port()

    up = _cli("dev", "up", "--json", "--kafka-port", str(kafka_port), "--redis-port", str(redis_port), env=dev_env)
    assert up.returncode == 0, up.stderr
    started = json.loads(up.stdout)
    assert started["running"] is True
    assert started["kafka"]["bootstrap_servers"] == f"127.0.0.1:{kafka_port}"
    assert started["settings"]["KAFKA_DLQ_REDIS_URL"] == f"redis://127.0.0.1:{redis_port}/0"

    again = _cli("dev", "up", "--json", "--kafka-port", str(kafka_port), "--redis-port", str(redis_port), env=dev_env)
    assert json.loads(again.stdout)["kafka"]["pid"] == started["kafka"]["pid"]  # found, not started twice

    exports = _cli("dev", "status", "--env", env=dev_env)
    assert f"export KAFKA_DLQ_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in exports.stdout

    down = _cli("dev", "down", "--json", env=dev_env)
    assert json.loads(down.stdout)["stopped"] is True
    status = _cli("dev", "status", "--json", env=dev_env)
    assert status.returncode == 1
    assert json.loads(status.stdout)["running"] is False


def test_dev_up_on_a_taken_port_fails_with_one_clear_line(dev_env):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        result = _cli("dev", "up", "--kafka-port", str(port), env=dev_env)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"127.0.0.1:{port} is already in use" in lines[0]
