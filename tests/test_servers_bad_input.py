"""Local servers that cannot start say why in one line, what to do, and where the log is."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from kafka_dlq.errors import KafkaDLQError, ServerError
from kafka_dlq.testing import KafkaServer, RedisServer, free_port, free_ports
from kafka_dlq.testing.servers import pid_alive, redis_command

FIX_AND_RETRY = "fix the setting or free the resource named there, then start it again"


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_no_java_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)

    with pytest.raises(ServerError) as caught:
        KafkaServer(data_dir=tmp_path / "k").start()

    message = _one_line(caught.value)
    assert "`java` was not found" in message
    assert "install a Java 17+ runtime" in message
    assert "or set JAVA_HOME" in message


def test_no_maven_and_no_jars_says_how_to_get_them(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = shutil.which("java")
    assert java is not None
    (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("KAFKA_DLQ_CACHE", str(tmp_path / "empty-cache"))

    with pytest.raises(ServerError) as caught:
        KafkaServer(data_dir=tmp_path / "k").start()

    message = _one_line(caught.value)
    assert "`mvn` was not found" in message
    assert "apt-get install maven" in message
    assert "or run `make setup`" in message


def test_a_port_already_taken_is_named(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(ServerError) as kafka_error:
            KafkaServer(port=port, data_dir=tmp_path / "k").start()
        with pytest.raises(ServerError) as redis_error:
            RedisServer(port=port, data_dir=tmp_path / "r").start()

    for caught in (kafka_error, redis_error):
        message = _one_line(caught.value)
        assert f"127.0.0.1:{port} is already in use" in message
        assert "stop whatever listens there" in message
        assert "or choose another port" in message


def test_a_bad_setting_is_caught_before_the_broker_starts(tmp_path):
    server = KafkaServer(data_dir=tmp_path / "k", properties={"num.io.threads": "not-a-number"})

    with pytest.raises(ServerError) as caught:
        server.start()

    message = _one_line(caught.value)
    assert "formatting Kafka's log folder failed" in message
    assert "num.io.threads" in message
    assert message.endswith(f"{FIX_AND_RETRY} (server log: {server.log_path})")


def test_a_broker_that_dies_at_start_reports_the_reason_and_its_log(tmp_path):
    server = KafkaServer(data_dir=tmp_path / "k")
    server.start()
    server.stop()
    # The folder is formatted now, so the broker itself reads the bad setting, and dies of it.
    server.properties["num.io.threads"] = "not-a-number"

    with pytest.raises(ServerError) as caught:
        server.start()

    message = _one_line(caught.value)
    assert "kafka exited with code" in message
    assert "num.io.threads" in message
    assert message.endswith(f"{FIX_AND_RETRY} (server log: {server.log_path})")
    assert caught.value.log_path == str(server.log_path)
    assert Path(caught.value.log_path).is_file()


def test_a_redis_that_will_not_start_reports_the_reason_and_its_log(tmp_path):
    server = RedisServer(data_dir=tmp_path / "r", extra_args=["--maxmemory", "lots"])

    with pytest.raises(ServerError) as caught:
        server.start()

    message = _one_line(caught.value)
    assert "redis exited with code" in message
    assert "maxmemory" in message
    assert message.endswith(f"{FIX_AND_RETRY} (server log: {server.log_path})")
    assert caught.value.log_path is not None and os.path.isfile(caught.value.log_path)


def test_server_errors_are_kafka_dlq_errors():
    assert issubclass(ServerError, KafkaDLQError)


def test_redis_with_aof_on_reports_it(tmp_path):
    with RedisServer(data_dir=tmp_path / "r", appendonly=True) as redis:
        info = redis_command(redis.port, "CONFIG", "GET", "appendonly")
    assert b"yes" in info


class _InterruptedKafka(KafkaServer):
    """A real broker whose start is interrupted (as by Ctrl-C or a test's timeout) once its JVM runs."""

    def _logged_started(self) -> bool:
        raise KeyboardInterrupt


class _InterruptedRedis(RedisServer):
    def _pings(self) -> bool:
        raise KeyboardInterrupt


@pytest.mark.parametrize("server_class", [_InterruptedKafka, _InterruptedRedis])
def test_an_interrupted_start_leaves_no_server_running(tmp_path, server_class):
    server = server_class(data_dir=tmp_path / "s")
    try:
        with pytest.raises(KeyboardInterrupt):
            server.start()

        assert server.process.pid is not None  # it had been spawned
        assert not pid_alive(server.process.pid)
    finally:
        server.kill()


def test_ports_picked_together_are_all_different():
    for _ in range(100):
        assert len(set(free_ports(3))) == 3


def test_a_broker_and_its_controller_never_share_a_port(tmp_path):
    taken = free_port()
    for _ in range(100):
        # The constructor only picks the ports: nothing starts.
        chosen = KafkaServer(data_dir=tmp_path)
        assert chosen.port != chosen.controller_port
        assert KafkaServer(port=taken, data_dir=tmp_path).controller_port != taken
        assert KafkaServer(controller_port=taken, data_dir=tmp_path).port != taken
