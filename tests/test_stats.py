"""``stats``: exact counts of what a DLQ holds, in every format, read from headers only."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

from hypothesis import HealthCheck, given, settings
from typer.testing import CliRunner

from kafka_dlq.cli import app
from kafka_dlq.formats import Undecodable, decode
from kafka_dlq.formats.spring import spring_headers
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord
from kafka_dlq.stats import collect_stats, summarize
from tests.helpers import seed
from tests.test_formats_decode import records as any_record
from tests.test_handler import dead_letter

T0 = 1_700_000_000_000
KINDS = ("native", "spring", "spring-retry", "connect", "streams", "seed-json", "undecodable", "parked")
TOPICS = ("orders", "payments", "emails")
ERRORS = ("builtins.ConnectionError", "java.lang.IllegalStateException", "app.errors.PaymentDeclinedError")


def mixed(i: int) -> tuple[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]], dict[str, str | None]]:
    """Dead letter ``i`` of a mixed DLQ, and what stats must say about it (written independently of stats)."""
    kind = KINDS[i % len(KINDS)]
    topic = TOPICS[i % len(TOPICS)]
    error = ERRORS[(i // 3) % len(ERRORS)]
    key, value = f"k{i}".encode(), b"v"
    expect: dict[str, str | None] = {"format": kind, "topic": topic, "error": error, "reason": None}
    if kind == "native":
        record = dead_letter(topic, key, value, error_class=error)
    elif kind == "parked":
        k, v, headers = dead_letter(topic, key, value, error_class=error)
        reason = "max_attempts" if (i // len(KINDS)) % 2 else "manual"
        record = (k, v, [*headers, ("dlq.reason", reason.encode())])
        expect.update(format="native", reason=reason)
    elif kind == "spring":
        # Spring's own encodings: partition, offset and timestamp as big-endian binary integers.
        letter = DeadLetter(
            original=OriginalRecord(topic=topic, partition=i % 7, offset=i, timestamp=T0 + i),
            failure=Failure(error_class=error, message="boom"),
        )
        record = (key, value, [("trace-id", b"abc"), *spring_headers(letter)])
    elif kind == "spring-retry":
        record = (
            key,
            value,
            [
                ("kafka_original-topic", topic.encode()),
                ("kafka_original-partition", (i % 7).to_bytes(4, "big")),
                ("kafka_original-offset", i.to_bytes(8, "big")),
                ("kafka_exception-fqcn", b"org.springframework.kafka.listener.ListenerExecutionFailedException"),
                ("kafka_exception-cause-fqcn", error.encode()),
                ("retry_topic-attempts", (3).to_bytes(4, "big")),
            ],
        )
    elif kind == "connect":
        record = (
            key,
            value,
            [
                ("__connect.errors.topic", topic.encode()),
                ("__connect.errors.partition", b"2"),
                ("__connect.errors.offset", str(i).encode()),
                ("__connect.errors.exception.class.name", error.encode()),
                ("__connect.errors.exception.message", b"Converting byte[] to Kafka Connect data failed"),
            ],
        )
    elif kind == "streams":
        record = (
            key,
            value,
            [("__streams.errors.topic", topic.encode()), ("__streams.errors.exception", b"%s: x" % error.encode())],
        )
    elif kind == "seed-json":
        short = error.rsplit(".", 1)[-1]
        envelope = {"original_topic": topic, "original_value": "v", "error": f"{short}: boom", "retry_count": 1}
        record = (key, json.dumps(envelope).encode(), [])
        expect["error"] = short
    else:
        record = (key, b"not a dead letter", [("content-type", b"text/plain")])
        expect.update(format="unknown", topic=None, error=None)
    return record, expect


def expected_counts(n: int) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {"topic": Counter(), "error": Counter(), "reason": Counter(), "format": Counter()}
    for i in range(n):
        _, expect = mixed(i)
        for what, counter in counts.items():
            value = expect[what]
            if value is not None:
                counter[value] += 1
            elif what == "error":
                counter["(none)"] += 1
    return counts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_record)
def test_given_any_record_summarize_agrees_with_decode(record: KafkaRecord) -> None:
    topic, error, reason, source, first, last = summarize(record)
    decoded = decode(record)

    assert source == decoded.source_format
    if isinstance(decoded, DeadLetter):
        assert (topic, error, first, last) == (
            decoded.original.topic,
            decoded.failure.error_class,
            decoded.first_failure,
            decoded.last_failure,
        )
        if decoded.reason is not None:
            assert reason == decoded.reason.value
    elif decoded.source_format is None:
        assert isinstance(decoded, Undecodable) and topic is None


async def test_stats_of_100k_mixed_dead_letters_count_exactly(kafka_bootstrap, new_topic):
    total = 100_000
    topic = await asyncio.to_thread(new_topic, 4, None, "mixed.dlq")
    started = time.perf_counter()
    await asyncio.to_thread(seed, kafka_bootstrap, topic, (mixed(i)[0] for i in range(total)))
    seeded = time.perf_counter() - started

    stats = await collect_stats({"bootstrap.servers": kafka_bootstrap}, [topic])

    print(f"\nstats of {total} mixed dead letters: {stats.seconds:.2f} s (seeding took {seeded:.1f} s)")
    expected = expected_counts(total)
    assert stats.records == total
    assert sum(p.records for p in stats.partitions) == total
    assert stats.undecodable == total // len(KINDS)
    assert stats.by_original_topic == dict(expected["topic"])
    assert stats.by_error_class == dict(expected["error"])
    assert stats.by_reason == dict(expected["reason"])
    assert stats.by_format == dict(expected["format"])
    assert sum(group.records for group in stats.groups) == total


async def test_stats_reports_failure_times_and_the_lag_of_a_group_per_partition(kafka_bootstrap, new_topic, group_id):
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = await asyncio.to_thread(new_topic, 3)
    letters = [dead_letter("orders", b"k%d" % i, b"v", first_failure=T0 + i * 1000) for i in range(10)]
    placed = {0: letters[:6], 1: letters[6:], 2: []}  # partition 2 stays empty

    def produce_and_commit() -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for partition, records in placed.items():
            for key, value, headers in records:
                producer.produce(topic, value=value, key=key, headers=headers, partition=partition)
        assert producer.flush(30) == 0
        consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
        # Partition 0: 2 of 6 done. Partition 1: never committed. Partition 2 (empty): committed past its end, as
        # offsets set by hand or a recreated topic leave it.
        done = [TopicPartition(topic, 0, 2), TopicPartition(topic, 2, 5)]
        consumer.commit(offsets=done, asynchronous=False)
        consumer.close()

    await asyncio.to_thread(produce_and_commit)

    stats = await collect_stats({"bootstrap.servers": kafka_bootstrap}, [topic], group=group_id)

    assert stats.oldest_failure == T0
    assert stats.newest_failure is not None and stats.newest_failure > T0 + 9000  # last failure: now
    got = {p.partition: (p.records, p.high, p.committed, p.lag) for p in stats.partitions}
    assert got == {0: (6, 6, 2, 4), 1: (4, 4, None, 4), 2: (0, 0, 5, 0)}
    assert stats.to_json()["lag"] == 8


def test_stats_command_prints_one_json_document(kafka_bootstrap, new_topic):
    topic = new_topic(1)
    seed(kafka_bootstrap, topic, [mixed(i)[0] for i in range(len(KINDS))])

    result = CliRunner().invoke(app, ["stats", topic, "--bootstrap", kafka_bootstrap, "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["records"] == len(KINDS)
    assert data["by_format"]["spring"] == 1
    text = CliRunner().invoke(app, ["stats", topic], env={"KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert text.exit_code == 0, text.output
    assert "8 record(s)" in text.stdout


def test_stats_takes_its_settings_from_the_config_file_and_flags_and_variables_win(
    kafka_bootstrap, new_topic, tmp_path
):
    from tests.test_redrive import CLEAN_ENV, run_config

    topic = new_topic(1)
    seed(kafka_bootstrap, topic, [mixed(i)[0] for i in range(len(KINDS))])
    good = run_config(tmp_path / "good.toml", kafka_bootstrap, topic)
    far = run_config(tmp_path / "far.toml", "127.0.0.1:9", topic)  # nothing listens there
    broken = run_config(tmp_path / "broken.toml", kafka_bootstrap, topic, kafka='"fetch.wait.max.ms" = "soon"')
    runner = CliRunner()

    from_file = runner.invoke(app, ["stats", topic, "--config", good, "--json"], env=CLEAN_ENV)
    env_wins = runner.invoke(
        app,
        ["stats", topic, "--json"],
        env={**CLEAN_ENV, "KAFKA_DLQ_CONFIG": far, "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap},
    )
    flag_wins = runner.invoke(
        app,
        ["stats", topic, "-c", far, "--bootstrap", kafka_bootstrap, "--group", "nobody", "--json"],
        env={**CLEAN_ENV, "KAFKA_DLQ_BOOTSTRAP_SERVERS": "127.0.0.1:9"},
    )
    file_kafka = runner.invoke(app, ["stats", topic, "--config", broken], env=CLEAN_ENV)

    assert from_file.exit_code == 0, from_file.output
    data = json.loads(from_file.stdout)
    # The file names the handler: its group's lag shows (it never committed: all of it).
    assert (data["records"], data["group"], data["lag"]) == (len(KINDS), "kafka-dlq-billing", len(KINDS))
    assert env_wins.exit_code == 0 and json.loads(env_wins.stdout)["records"] == len(KINDS)
    assert flag_wins.exit_code == 0 and json.loads(flag_wins.stdout)["group"] == "nobody"
    assert file_kafka.exit_code == 1 and "fetch.wait.max.ms" in file_kafka.output


def test_stats_of_a_missing_topic_says_so(kafka_bootstrap):
    result = CliRunner().invoke(app, ["stats", "no-such-topic-here", "--bootstrap", kafka_bootstrap])

    assert result.exit_code == 1
    assert "do not exist" in result.output


def test_given_a_redriven_record_that_failed_again_in_the_seed_system_stats_counts_it_as_seed():
    # A redrive's dlq.attempts/dlq.first.failure/dlq.redrive.count came along on the seed publisher's envelope.
    headers = (("dlq.attempts", b"3"), ("dlq.first.failure", b"1700000000000"), ("dlq.redrive.count", b"1"))
    envelope = {"original_topic": "orders", "original_value": "v", "error": "KeyError: x", "attempt_count": 1}
    record = KafkaRecord(
        topic="orders.dlq", partition=0, offset=0, timestamp=T0, value=json.dumps(envelope).encode(), headers=headers
    )

    topic, error, _, source, _, _ = summarize(record)

    assert (topic, error, source) == ("orders", "KeyError", "seed-json")


def test_given_a_redriven_record_that_failed_again_in_spring_stats_keeps_its_first_failure():
    letter = DeadLetter(original=OriginalRecord(topic="orders"), failure=Failure(error_class="java.lang.Error"))
    headers = (("dlq.attempts", b"3"), ("dlq.first.failure", b"%d" % T0), *spring_headers(letter))
    record = KafkaRecord(topic="orders.dlq", partition=0, offset=0, timestamp=T0 + 60_000, headers=headers)

    assert summarize(record)[3:] == ("spring", T0, T0 + 60_000)


def test_stats_shows_the_lag_of_the_group_the_handler_uses_its_group_id_before_its_name(
    kafka_bootstrap, new_topic, tmp_path
):
    from tests.test_redrive import CLEAN_ENV

    topic = new_topic(1)
    seed(kafka_bootstrap, topic, [mixed(0)[0]])
    path = tmp_path / "run.toml"
    path.write_text(f'name = "billing"\ngroup_id = "billing-consumers"\nbootstrap_servers = "{kafka_bootstrap}"\n')

    # KAFKA_DLQ_NAME names the handler, as it does for the handler itself: its group_id still decides the group.
    result = CliRunner().invoke(
        app,
        ["stats", topic, "-c", str(path), "--json"],
        env={**CLEAN_ENV, "KAFKA_DLQ_GROUP_ID": None, "KAFKA_DLQ_NAME": "billing"},
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["group"] == "billing-consumers"
