"""The README's "Operating a DLQ" walk-through runs as written against the real broker and Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from kafka_dlq.kafka.admin import create_topics, delete_topics
from tests.helpers import read_all, seed
from tests.test_handler import dead_letter

README = Path(__file__).resolve().parent.parent / "README.md"


def _walkthrough() -> list[str]:
    text = README.read_text()
    block = re.search(r"<!-- walkthrough -->\s*```bash\n(.*?)```\s*<!-- /walkthrough -->", text, re.S)
    assert block, "the README lost its walk-through"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _line(lines: list[str], text: str) -> int:
    """The index of the one walk-through line holding ``text``."""
    found = [index for index, line in enumerate(lines) if text in line]
    assert len(found) == 1, f"{text!r} is on {len(found)} walk-through lines"
    return found[0]


def test_the_operating_walkthrough_runs_as_written(kafka_bootstrap, redis_url, tmp_path):
    create_topics(kafka_bootstrap, {"payments.dlq": 2, "payments.dlq.poison": 1, "payments": 1})
    try:
        slow = [
            dead_letter("payments", f"p{i}".encode(), b'{"amount": %d}' % i, error_class="builtins.TimeoutError")
            for i in range(6)
        ]
        bad = [dead_letter("payments", f"bad{i}".encode(), b"{}", error_class="builtins.ValueError") for i in range(2)]
        seed(kafka_bootstrap, "payments.dlq", slow + bad)
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "COLUMNS": "160",
            "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_DLQ_REDIS_URL": redis_url,
        }
        outputs = []
        lines = _walkthrough()
        for line in lines:
            started = time.monotonic()
            result = subprocess.run(
                ["bash", "-c", line], env=env, capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path
            )
            outputs.append(result.stdout)
            assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
            print(f"{time.monotonic() - started:5.1f} s  {line}")

        # Read until nothing more comes (no expected count to stop at): a duplicate would show.
        back = read_all(kafka_bootstrap, "payments", idle=3.0)
        assert sorted(m.key() for m in back) == sorted(f"p{i}".encode() for i in range(6))  # each once
        for m in back:
            headers = dict(m.headers())
            assert (headers["dlq.redrive.count"], headers["dlq.attempts"]) == (b"1", b"1")
        parked = read_all(kafka_bootstrap, "payments.dlq.poison", idle=3.0)
        assert sorted(m.key() for m in parked) == [b"bad0", b"bad1"]
        assert all(dict(m.headers())["dlq.reason"] == b"manual" for m in parked)
        stats = outputs[_line(lines, "kafka-dlq stats")]
        assert "TimeoutError" in stats  # stats names the error classes
        assert "lag of group kafka-dlq-billing: 8" in " ".join(stats.split())  # and the handler's lag
        rerun = json.loads(outputs[_line(lines, "a rerun resumes")])
        assert (rerun["read"], rerun["selected"], rerun["sent"]) == (0, 0, {})  # it resumed at the end
    finally:
        delete_topics(kafka_bootstrap, ["payments.dlq", "payments.dlq.poison", "payments"])


def test_the_commands_the_readme_says_take_config_take_it_and_those_it_says_do_not_do_not():
    from typer.testing import CliRunner

    from kafka_dlq.cli import app

    text = " ".join(README.read_text().split())
    said = re.search(r"The operator commands \((.*?)\) take their connection settings", text)
    assert said, "the README lost its sentence on which commands take --config"
    commands = re.findall(r"`([a-z-]+)`", said.group(1))
    assert {"stats", "peek", "redrive", "park", "pending", "doctor"} <= set(commands)
    without = re.search(r"((?:`[a-z-]+` and )?`[a-z-]+`) take no `--config`", text)
    assert without
    runner = CliRunner()

    def options(*command: str) -> str:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    for command in commands:
        assert "--config" in options(command), command
    for sub in ("retry-now", "park", "drop"):  # "pending and its subcommands"
        assert "--config" in options("pending", sub), sub
    for command in re.findall(r"`([a-z-]+)`", without.group(1)):
        assert "--config" not in options(command), command
