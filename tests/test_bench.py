"""`kafka-dlq bench`: it runs on small inputs and reports the documented fields. How fast is never a test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from confluent_kafka.admin import AdminClient


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kafka_dlq", "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _bench_topics(bootstrap: str) -> list[str]:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return [name for name in topics if name.startswith("kafka-dlq-bench-")]


def test_bench_client_json_is_one_object_with_the_documented_fields(kafka_bootstrap):
    result = _bench("client", "--records", "2000", "--size", "1024", "--bootstrap", kafka_bootstrap, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout, or this fails: logs go to stderr
    assert report["name"] == "client"
    assert report["records"] == 2000
    assert report["size"] == 1024
    assert report["records_per_second"] > 0
    assert report["baseline"]
    assert report["baseline_records_per_second"] > 0
    assert report["ratio"] == pytest.approx(
        report["records_per_second"] / report["baseline_records_per_second"], abs=0.002
    )
    lag = report["loop_lag_ms"]
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert set(report["cases"]) == {"produce", "consume", "copy"}
    for case in report["cases"].values():
        assert case["records"] == 2000
        assert case["records_per_second"] > 0
        assert case["baseline_records_per_second"] > 0
    assert report["cases"]["copy"]["ratio"] == report["ratio"]  # the headline is the copy case
    assert _bench_topics(kafka_bootstrap) == []  # the benchmark's own topics are gone


def test_bench_client_without_json_prints_a_table_of_the_cases(kafka_bootstrap):
    result = _bench("client", "--records", "500", "--bootstrap", kafka_bootstrap)

    assert result.returncode == 0, result.stderr
    for word in ("produce", "consume", "copy", "ratio", "loop lag"):
        assert word in result.stdout


def test_an_unknown_bench_name_fails_with_one_line_naming_the_known_ones(kafka_bootstrap):
    result = _bench("nope", "--bootstrap", kafka_bootstrap, "--json")

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'nope'" in lines[0]
    assert "client" in lines[0]


@pytest.mark.parametrize(("name", "cases"), [("handler", {"recover", "fail-once"}), ("consumer", {"ok", "1pct-fail"})])
def test_bench_handler_json_has_the_documented_fields(kafka_bootstrap, redis_url, name, cases):
    result = _bench(name, "--records", "500", "--bootstrap", kafka_bootstrap, "--redis-url", redis_url, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["name"] == name
    assert report["records"] == 500
    assert report["records_per_second"] > 0
    assert report["baseline"]
    assert report["baseline_records_per_second"] > 0
    assert report["ratio"] == pytest.approx(
        report["records_per_second"] / report["baseline_records_per_second"], abs=0.002
    )
    lag = report["loop_lag_ms"]
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert set(report["cases"]) == cases
    assert _bench_topics(kafka_bootstrap) == []


def test_the_bare_loops_run_with_the_client_layers_own_defaults():
    # bench client spells the layer's producer defaults (and its fetch back-off) out for the bare loop: a default
    # changed in the layer and not there would measure the two sides with different settings.
    from kafka_dlq.bench.client import Settings
    from kafka_dlq.kafka import consumer, producer

    settings = Settings({"bootstrap.servers": "127.0.0.1:1"})
    assert producer._DEFAULTS.items() <= settings.producer().items()
    backoff = "fetch.queue.backoff.ms"
    assert settings.consumer("x")[backoff] == consumer._DEFAULTS[backoff]


def test_a_bare_loops_last_commit_accepts_that_the_periodic_one_took_everything(kafka_bootstrap, topic):
    # A copy that ends just after its periodic (asynchronous) commit has nothing left to commit: librdkafka says
    # "no offset stored", which must not fail the benchmark's baseline.
    from confluent_kafka import Consumer, KafkaException, Producer

    from kafka_dlq.bench.client import Settings, _commit_last

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, b"v")
    assert producer.flush(30) == 0
    consumer = Consumer(Settings({"bootstrap.servers": kafka_bootstrap}).consumer("last-commit"))
    try:
        consumer.subscribe([topic])
        got = []
        for _ in range(60):
            got += consumer.consume(10, 0.5)
            if got:
                break
        assert [m.value() for m in got] == [b"v"]
        consumer.commit(asynchronous=False)
        with pytest.raises(KafkaException, match="No offset stored"):
            consumer.commit(asynchronous=False)  # what librdkafka says, and what the bare loop used to fail on
        _commit_last(consumer)
    finally:
        consumer.close()
