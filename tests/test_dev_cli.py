"""`kafka-dlq dev up | status | down`: the local stack for a person at a shell."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kafka_dlq import dev
from kafka_dlq.cli import _fail
from kafka_dlq.errors import ServerError
from kafka_dlq.testing import free_port, free_ports
from kafka_dlq.testing.servers import pid_alive


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
    kafka_port, redis_port = free_ports(2)

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
    assert not pid_alive(started["kafka"]["pid"])
    assert not pid_alive(started["redis"]["pid"])


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


def test_a_stale_state_file_leaves_the_process_that_now_has_its_pid_alone(dev_env):
    # Given: the state file of a stack that is gone (a reboot), whose pids now belong to an unrelated program
    # that, like our servers, leads its own process group.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        folder = Path(dev_env["KAFKA_DLQ_DEV_DIR"])
        folder.mkdir(parents=True)
        stale = {
            "kafka_pid": bystander.pid,
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
            "kafka_version": "4.4.0",
            "redis_pid": bystander.pid,
            "redis_port": free_port(),
            "redis_version": "7.0.15",
            "folder": str(folder),
        }
        (folder / "state.json").write_text(json.dumps(stale))

        # When / then: status says the state is stale, and down forgets it without signalling the bystander.
        status = _cli("dev", "status", "--json", env=dev_env)
        assert status.returncode == 1
        reported = json.loads(status.stdout)
        assert reported["running"] is False
        assert reported["stale"] is True
        assert "stale" in _cli("dev", "status", env=dev_env).stdout

        down = _cli("dev", "down", "--json", env=dev_env)
        assert down.returncode == 0, down.stderr
        assert bystander.poll() is None
        assert not (folder / "state.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_zombie_is_not_alive():
    child = subprocess.Popen(["true"])
    try:
        # Not reaped yet: the kernel keeps the exited child as a zombie until we wait for it.
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":
            os.sched_yield()

        assert pid_alive(child.pid) is False
    finally:
        child.wait()
    assert pid_alive(child.pid) is False


@pytest.mark.parametrize("message", ["process.roles=[broker, controller] is wrong", "cannot write to [/tmp]"])
def test_an_error_prints_as_written_even_with_brackets(capsys, message):
    exit_ = _fail(ServerError(message))

    assert exit_.exit_code == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_an_interrupted_dev_up_leaves_no_server_running(monkeypatch, tmp_path):
    monkeypatch.setenv("KAFKA_DLQ_DEV_DIR", str(tmp_path / "dev"))
    kafka_port, controller_port, redis_port = free_ports(3)

    def interrupted(stack: object) -> dict[str, object]:
        raise KeyboardInterrupt  # Ctrl-C once both servers run, before the state file names them

    monkeypatch.setattr(dev, "asdict", interrupted)

    with pytest.raises(KeyboardInterrupt):
        dev.dev_up(kafka_port=kafka_port, controller_port=controller_port, redis_port=redis_port)

    for port in (kafka_port, controller_port, redis_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2.0).close()
    assert not (tmp_path / "dev" / "state.json").exists()
