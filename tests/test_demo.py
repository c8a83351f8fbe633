"""The README's main job, `kafka-dlq demo`, runs to its end with every record through its door."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_the_demo_ends_by_itself_with_every_record_recovered_or_parked(kafka_bootstrap, redis_url):
    result = subprocess.run(
        [sys.executable, "-m", "kafka_dlq", "demo", "--json", "--bootstrap", kafka_bootstrap, "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["recovered"] + summary["parked"] == summary["records"] == 130
    assert summary["parked_by_reason"] == {"undecodable": 5, "max_age": 5, "no_processor": 5, "non_retryable": 10}
    assert summary["circuit_opened"] >= 1
