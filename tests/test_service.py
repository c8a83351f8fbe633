"""`kafka-dlq run`: configuration, the HTTP endpoint, and a crash (SIGKILL) mid-run that loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from kafka_dlq.config import load_config
from kafka_dlq.errors import ConfigError
from kafka_dlq.handler import DLQHandler, KeyFormat
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.schedule import connect_redis
from kafka_dlq.testing import free_port
from kafka_dlq.web.app import create_app, running
from tests.helpers import seed
from tests.test_handler import dead_letter

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "handler.toml"
    path.write_text(text)
    return path


def test_a_config_file_and_environment_make_a_handler(tmp_path):
    path = _write(
        tmp_path,
        """
name = "billing"
topics = ["payments.dlq"]
processor_timeout = 5
[processors]
payments = "tests.crash_processor:process"
[policy]
initial_delay = 0.5
max_attempts = 4
[policy.topics.payments]
max_attempts = 9
[classifier]
non_retryable_patterns = ["400"]
[breaker]
failure_threshold = 3
""",
    )
    env = {"KAFKA_DLQ_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_DLQ_REDIS_URL": "redis://127.0.0.1:2/0"}

    handler = load_config(path, env).build()

    assert isinstance(handler, DLQHandler)
    assert handler.bootstrap_servers == "127.0.0.1:1"
    assert handler.group_id == "kafka-dlq-billing"
    assert handler.policies.for_topic("payments").max_attempts == 9
    assert handler.policies.for_topic("payments").initial_delay == 0.5
    assert handler.policies.for_topic("other").max_attempts == 4
    assert handler.breaker_settings.failure_threshold == 3
    assert "payments" in handler.processors
    assert handler.keys is KeyFormat.TEXT  # keys are UTF-8 text unless the config says otherwise


def test_binary_keys_are_accepted_when_the_config_says_so(tmp_path):
    path = _write(tmp_path, 'name = "x"\ntopics = ["t"]\nkeys = "bytes"\n')
    env = {"KAFKA_DLQ_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_DLQ_REDIS_URL": "redis://127.0.0.1:2/0"}

    assert load_config(path, env).build().keys is KeyFormat.BYTES
    text_file = _write(tmp_path, 'name = "x"\ntopics = ["t"]\n')
    assert load_config(text_file, {**env, "KAFKA_DLQ_KEYS": "bytes"}).build().keys is KeyFormat.BYTES


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\nretries = 3\n', "'retries' is unknown"),
        ('name = "x"\ntopics = ["t"]\n', "bootstrap_servers (or KAFKA_DLQ_BOOTSTRAP_SERVERS)"),
        ('name = "x"\ntopics = "t"\nbootstrap_servers = "b"\nredis_url = "r"\n', "'topics': expected a list"),
        (
            'name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\n[processors]\nt = "nope"\n',
            "'processors.t'",
        ),
        (
            'name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\n[processors]\nt = "no.such:f"\n',
            "cannot import module 'no.such'",
        ),
        (
            'name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\n[policy]\nmultiplier = 0.5\n',
            "'policy'",
        ),
        ('name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\n[policy]\ndelay = 1\n', "'policy'"),
        ("name = [", "not valid TOML"),
        ('name = "x"\ntopics = ["t"]\nbootstrap_servers = "b"\nredis_url = "r"\nkeys = "binary"\n', "'keys'"),
    ],
)
def test_a_config_error_names_the_key_and_the_fix(tmp_path, text, names):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text), {})
    assert names in str(caught.value)


def test_the_cli_reports_a_config_error_in_one_line(tmp_path):
    path = _write(tmp_path, 'name = "x"\ntopics = ["t"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "kafka_dlq", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "bootstrap_servers" in result.stderr


async def test_the_ops_endpoint_serves_metrics_health_and_readiness(kafka_bootstrap, redis_url, new_topic, unique_name):
    topic = await asyncio.to_thread(new_topic, 1, None, "ops.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{topic}.poison": 1})
    handler = DLQHandler(
        name=unique_name("ops"), topics=[topic], bootstrap_servers=kafka_bootstrap, redis_url=redis_url
    )
    port = free_port()
    async with handler, running(create_app(handler), port=port), httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{port}"
        metrics = await client.get(f"{base}/metrics")
        health = await client.get(f"{base}/healthz")
        ready = await client.get(f"{base}/readyz")
    assert metrics.status_code == 200
    assert "kafka_dlq_event_loop_lag_seconds" in metrics.text
    assert health.json()["status"] == "ok"
    assert ready.status_code == 200 and ready.json()["ready"] is True


def _start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "kafka_dlq", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_handler_killed_mid_run_loses_nothing_and_repeats_at_most_what_was_in_flight(
    kafka_bootstrap, redis_url, new_topic, unique_name, tmp_path
):
    topic = await asyncio.to_thread(new_topic, 2, None, "crash.dlq")
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{topic}.poison": 1})
    total, in_flight = 1000, 40
    await asyncio.to_thread(
        seed, kafka_bootstrap, topic, [dead_letter("orders", f"c{i}".encode(), b"v") for i in range(total)]
    )
    name = unique_name("crash")
    config = await asyncio.to_thread(
        _write,
        tmp_path,
        f"""
name = "{name}"
topics = ["{topic}"]
processor_timeout = 2
# A lease far longer than a call: only the kills make repeats, not a live instance whose call and finish outlast
# the lease on a loaded machine (the entry claimed again while the first call still finishes).
lease = 15
max_in_flight = {in_flight}
concurrency = {in_flight}
[processors]
orders = "tests.crash_processor:process"
[policy]
initial_delay = 0.05
max_delay = 0.2
[kafka]
# A killed member leaves the group after 10 s, not librdkafka's 45 s default: the next instance takes over the
# partitions the killed one had not finished reading. (Not the broker's 6 s minimum: a loaded machine would let
# live members' sessions lapse.)
"session.timeout.ms" = 10000
""",
    )
    calls_key = f"crash-calls:{name}"
    env = {
        **os.environ,
        "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_DLQ_REDIS_URL": redis_url,
        "CRASH_TEST_REDIS_URL": redis_url,
        "CRASH_TEST_CALLS_KEY": calls_key,
    }
    redis = connect_redis(redis_url)
    keys = {part: f"kafka-dlq:{{{name}}}:{part}" for part in ("due", "inflight", "done")}
    log = tmp_path / "run.log"

    async def seen() -> int:
        """Entries the handlers put in the schedule so far, waiting, running or finished."""
        return sum([await redis.zcard(key) for key in keys.values()])

    async def run_until(reached: Callable[[], Awaitable[bool]], timeout: float, what: str) -> subprocess.Popen[bytes]:
        handler = await asyncio.to_thread(_start, config, env, log)
        deadline = time.monotonic() + timeout
        while not await reached():
            assert handler.poll() is None, await asyncio.to_thread(log.read_text)
            assert time.monotonic() < deadline, f"{what}: only {await redis.zcard(keys['done'])} of {total} finished"
            await asyncio.sleep(0.01)
        return handler

    try:
        # 1: killed as soon as its first intake batch is in Redis, while it is still reading the DLQ.
        first = await run_until(lambda: _positive(seen()), 60, "the first handler's first intake")
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait)
        read_at_first_kill = await seen()
        # 2: killed mid-run, with retries in flight (past the first half, which it may find all scheduled).
        mid_run = total * 7 // 10
        second = await run_until(lambda: _at_least(redis.zcard(keys["done"]), mid_run), 120, "the second handler")
        second.send_signal(signal.SIGKILL)
        await asyncio.to_thread(second.wait)
        finished_at_second_kill = await redis.zcard(keys["done"])
        # 3: finishes the work, and stops gracefully.
        third = await run_until(lambda: _at_least(redis.zcard(keys["done"]), total), 120, "the third handler")
        third.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(third.wait, 60) == 0, await asyncio.to_thread(log.read_text)

        calls = {k.decode(): int(v) for k, v in (await redis.hgetall(calls_key)).items()}
        pending = await redis.zcard(keys["due"]) + await redis.zcard(keys["inflight"])
        finished = await redis.zcard(keys["done"])
    finally:
        await redis.aclose()
    expected = {f"c{i}": 2 if i % 5 == 0 else 1 for i in range(total)}
    repeats = sum(calls.values()) - sum(expected.values())
    print(
        f"\ncrash: first kill with {read_at_first_kill} of {total} records in the schedule, second kill with "
        f"{finished_at_second_kill} finished; {repeats} repeated processor calls (bound 2 x {in_flight})"
    )
    assert finished == total
    assert set(calls) == set(expected)
    assert all(calls[k] >= expected[k] for k in expected)
    assert 0 <= repeats <= 2 * in_flight  # at most what was in flight at each of the two kills
    assert pending == 0


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


async def _at_least(count: Awaitable[int], threshold: int) -> bool:
    return await count >= threshold
