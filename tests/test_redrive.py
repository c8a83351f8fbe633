"""Redrive, park and peek against the real broker: exactly the selected records, exactly once, never too fast."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from kafka_dlq import redrive as redrive_module
from kafka_dlq.cli import app
from kafka_dlq.errors import KafkaDLQError, TopicNotFoundError
from kafka_dlq.filters import RecordFilter
from kafka_dlq.formats import decode, encode_native
from kafka_dlq.kafka import KafkaRecord
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord
from kafka_dlq.redrive import (
    MAX_ABORTS,
    Action,
    Guarantee,
    RateLimiter,
    Refusal,
    default_group,
    park,
    peek,
    record_view,
    redrive,
    redrive_record,
    show_bytes,
)
from tests.helpers import committed_offsets, read_all, seed

Wire = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]
FIRST_FAILURE = 1_714_564_700_000
HISTORY = [("dlq.attempts", b"3"), ("dlq.first.failure", b"%d" % FIRST_FAILURE)]
"""The failure history every dead letter of ``dead_letter`` carries home when redriven."""


def dead_letter(
    topic: str,
    i: int,
    *,
    error_class: str = "builtins.TimeoutError",
    redrive_count: int = 0,
    value: bytes | None = None,
    pad: int = 0,
    message: str | None = None,
) -> Wire:
    """A native dead letter of record ``i`` of ``topic``: key ``k<i>``, a ``seq`` header, and a JSON value."""
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(
                topic=topic,
                partition=0,
                offset=i,
                timestamp=1_714_564_800_000,
                key=b"k%d" % i,
                value=value if value is not None else b'{"i": %d}' % i + b" " * pad,
                headers=(("seq", b"%d" % i), ("traceparent", b"00-abc-01")),
            ),
            failure=Failure(error_class=error_class, message=message or f"failure {i}", stacktrace="Traceback ..."),
            attempts=3,
            first_failure=FIRST_FAILURE,
            last_failure=FIRST_FAILURE + 60_000,
            group="orders-service",
            redrive_count=redrive_count,
        )
    )
    return encoded.key, encoded.value, list(encoded.headers)


def as_record(msg) -> KafkaRecord:
    return KafkaRecord(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        key=msg.key(),
        value=msg.value(),
        headers=tuple(msg.headers() or ()),
    )


async def topics(new_topic, *partitions: int) -> list[str]:
    return [await asyncio.to_thread(new_topic, count) for count in partitions]


# ---------------------------------------------------------------- pure parts


def in_dlq(record: Wire, offset: int = 0) -> KafkaRecord:
    key, value, headers = record
    return KafkaRecord(topic="orders.dlq", partition=0, offset=offset, key=key, value=value, headers=tuple(headers))


def test_a_redriven_record_is_the_original_with_its_failure_history_and_its_redrive_count_one_higher():
    out = redrive_record(decode(in_dlq(dead_letter("orders", 7, redrive_count=1))))
    assert not isinstance(out, Refusal)
    assert (out.topic, out.key, out.value) == ("orders", b"k7", b'{"i": 7}')
    # The original headers, the attempt history the next consumer carries forward, the loop guard; no other dlq.*.
    assert out.headers == (("seq", b"7"), ("traceparent", b"00-abc-01"), *HISTORY, ("dlq.redrive.count", b"2"))
    assert redrive_record(decode(in_dlq(dead_letter("orders", 7))), to="orders.replay").topic == "orders.replay"


def test_a_dead_letter_in_a_foreign_format_goes_home_with_its_history_in_native_headers():
    envelope = {
        "original_topic": "orders",
        "original_value": "v",
        "error": "TimeoutError: slow",
        "retry_count": 4,
        "first_failure_time": 1_714_564_700,
    }
    record = KafkaRecord(
        topic="orders.dlq",
        partition=0,
        offset=3,
        timestamp=1_714_564_800_000,
        value=json.dumps(envelope).encode(),
        headers=(("tenant", b"acme"), ("dlq.note", b"stale"), ("dlq.redrive.count", b"1")),
    )

    out = redrive_record(decode(record))

    assert not isinstance(out, Refusal)
    assert out.topic == "orders" and out.value == b"v"
    assert out.headers == (
        ("tenant", b"acme"),
        ("dlq.attempts", b"5"),  # four retries after the first failure
        ("dlq.first.failure", b"1714564700000"),
        ("dlq.redrive.count", b"2"),
    )


def test_the_loop_guard_and_undecodable_records_are_refusals_with_a_reason():
    record = KafkaRecord(topic="orders.dlq", partition=0, offset=0, value=b"\x00binary")
    assert redrive_record(decode(record)).kind == "undecodable"
    guarded = decode(in_dlq(dead_letter("orders", 1, redrive_count=3)))
    refusal = redrive_record(guarded, max_redrives=3)
    assert refusal == Refusal("loop_guard", "redriven 3 times already (limit 3)")
    assert not isinstance(redrive_record(guarded, max_redrives=4), Refusal)


def test_shown_bytes_never_carry_control_characters_to_a_terminal():
    assert show_bytes(b"plain text") == "plain text"
    assert show_bytes("café".encode()) == "café"
    assert show_bytes(b"\x1b[2J\x00\xff\n") == "\\x1b[2J\\x00\\xff\\n"
    assert show_bytes(b"x" * 10, 4) == "xxxx... (10 bytes)"


async def test_the_rate_limiter_starts_empty_and_never_lets_more_than_the_rate_through():
    limiter = RateLimiter(1000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(300):
        await limiter.take()
    assert loop.time() - started >= 0.299
    await asyncio.sleep(0.2)  # a pause: the bucket fills up to its burst (a tenth of a second's worth), no more
    resumed = loop.time()
    for _ in range(200):
        await limiter.take()
    assert loop.time() - resumed >= 0.099


def test_a_record_view_escapes_control_characters_in_every_text_it_shows():
    record = in_dlq(dead_letter("orders\x1b[1m", 1, error_class="x.\x07Bell", message="boom\x1b[2J\r", value=b"\x1b"))
    view = record_view(record, decode(record))
    assert view["original"]["topic"] == "orders\\x1b[1m"
    assert view["error"] == {"class": "x.\\x07Bell", "message": "boom\\x1b[2J\\r"}
    assert view["value"] == "\\x1b" and view["value_format"] == "text"
    assert all(text.isprintable() for text in _texts(view))


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [text for item in value for text in _texts(item)] if isinstance(value, list) else []


def test_the_default_group_follows_the_filter_the_destination_and_the_limit():
    base = default_group(Action.REDRIVE, "orders.dlq", RecordFilter(), None, 3)
    assert base.startswith("kafka-dlq-redrive-orders.dlq-")
    assert base == default_group(Action.REDRIVE, "orders.dlq", RecordFilter(), None, 3)
    others = {
        default_group(Action.REDRIVE, "orders.dlq", RecordFilter(keys=(b"k",)), None, 3),
        default_group(Action.REDRIVE, "orders.dlq", RecordFilter(), "orders.replay", 3),
        default_group(Action.REDRIVE, "orders.dlq", RecordFilter(), None, 4),
        default_group(Action.PARK, "orders.dlq", RecordFilter(), None, 3),
    }
    assert base not in others and len(others) == 4


# ---------------------------------------------------------------- redrive


async def test_redrive_with_a_filter_sends_exactly_the_matching_records_home(kafka_bootstrap, new_topic):
    dlq, orders, payments = await topics(new_topic, 3, 2, 1)
    records = [
        dead_letter(orders if i % 2 else payments, i, error_class="builtins.TimeoutError" if i % 3 else "KeyError")
        for i in range(60)
    ]
    records.append((b"junk", b"\xff\x00 undecodable", []))
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, records)
    select = RecordFilter(error_classes=("TimeoutError",))

    report = await redrive(kafka_bootstrap, dlq, select=select)

    chosen = [i for i in range(60) if i % 3]
    assert report.sent == Counter({orders: sum(i % 2 for i in chosen), payments: sum(1 - i % 2 for i in chosen)})
    assert (report.read, report.skipped, report.refused) == (61, 21, Counter())
    assert report.transactions >= 1 and report.aborted == 0
    got = {}
    for topic in (orders, payments):
        for msg in await asyncio.to_thread(
            read_all, kafka_bootstrap, topic, expected=report.sent[topic], idle=30, extra=1.0
        ):
            got[msg.key()] = (msg.topic(), msg.value(), msg.headers())
    assert set(got) == {b"k%d" % i for i in chosen}
    for i in chosen:
        home = orders if i % 2 else payments
        headers = [("seq", b"%d" % i), ("traceparent", b"00-abc-01"), *HISTORY, ("dlq.redrive.count", b"1")]
        assert got[b"k%d" % i] == (home, b'{"i": %d}' % i, headers)

    # The same redrive again resumes at the end: nothing twice. The rest stayed, and another filter finds them.
    assert (await redrive(kafka_bootstrap, dlq, select=select)).read == 0
    rest = await redrive(kafka_bootstrap, dlq, select=RecordFilter(error_classes=("KeyError",)), to=payments)
    assert rest.sent == Counter({payments: 20})
    assert rest.refused == Counter()  # the undecodable record has no error class to match


async def test_dry_run_counts_per_destination_with_samples_and_sends_nothing(kafka_bootstrap, new_topic):
    dlq, orders, payments = await topics(new_topic, 2, 1, 1)
    records = [dead_letter(orders if i < 7 else payments, i, redrive_count=3 if i == 9 else 0) for i in range(10)]
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, records)

    dry = await redrive(kafka_bootstrap, dlq, dry_run=True, sample=3)

    assert dry.sent == Counter({orders: 7, payments: 2})
    assert dry.refused == Counter({"loop_guard": 1})
    assert len(dry.samples) == 3 and all(s["destination"] in (orders, payments) for s in dry.samples)
    assert dry.to_json()["samples"][0]["value_format"] == "json"
    assert await asyncio.to_thread(read_all, kafka_bootstrap, orders, idle=1.0) == []
    group = default_group(Action.REDRIVE, dlq, RecordFilter(), None, 3)
    assert set((await asyncio.to_thread(committed_offsets, kafka_bootstrap, group, dlq, 2)).values()) == {-1001}
    # A real run after it finds every record still there.
    assert (await redrive(kafka_bootstrap, dlq)).sent == dry.sent


async def test_the_loop_guard_stops_a_record_that_keeps_coming_back(kafka_bootstrap, new_topic):
    dlq, orders = await topics(new_topic, 1, 1)
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter(orders, 1)])
    counts = []
    for _ in range(5):
        report = await redrive(kafka_bootstrap, dlq, max_redrives=3)
        if report.refused:
            break
        # The record fails again at home: its consumer dead-letters it once more, keeping the redrive count.
        msg = (await asyncio.to_thread(read_all, kafka_bootstrap, orders, expected=len(counts) + 1, idle=30))[-1]
        count = int(dict(msg.headers())["dlq.redrive.count"])
        counts.append(count)
        again = DeadLetter(
            original=OriginalRecord(topic=orders, key=msg.key(), value=msg.value(), headers=(("seq", b"1"),)),
            failure=Failure(error_class="builtins.TimeoutError"),
            redrive_count=count,
        )
        encoded = encode_native(again)
        await asyncio.to_thread(seed, kafka_bootstrap, dlq, [(encoded.key, encoded.value, list(encoded.headers))])
    assert counts == [1, 2, 3]
    assert report.refused == Counter({"loop_guard": 1}) and report.sent == Counter()
    assert report.refusals == [
        {"dlq": f"{dlq}/0/3", "kind": "loop_guard", "detail": "redriven 3 times already (limit 3)"}
    ]


@pytest.mark.slow
async def test_rate_500_over_5000_records_never_runs_faster_than_the_rate(kafka_bootstrap, new_topic):
    dlq, orders = await topics(new_topic, 3, 3)
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(5000)])

    started = time.monotonic()
    report = await redrive(kafka_bootstrap, dlq, rate=500)
    took = time.monotonic() - started

    home = await asyncio.to_thread(read_all, kafka_bootstrap, orders, expected=5000, idle=30, extra=1.0)
    stamps = [msg.timestamp()[1] for msg in home]  # set by the producer as each record was sent
    sent_over = (max(stamps) - min(stamps)) / 1000
    print(
        f"\n5,000 records at --rate 500: {took:.2f} s in all, {report.seconds:.2f} s reported, sent over "
        f"{sent_over:.2f} s, {report.records_per_second:.1f} records/s"
    )
    assert report.sent == Counter({orders: 5000}) and len(home) == 5000
    # The bound is the property (a limit must never let more through), measured apart from the code under test:
    # by the clock around the call, and by when the broker's records say they were sent.
    assert took >= 9.0
    assert sent_over >= 9.0
    assert report.seconds >= 9.0


async def test_a_missing_destination_stops_the_run_and_a_rerun_after_creating_it_continues(
    kafka_bootstrap, new_topic, unique_name
):
    dlq, orders = await topics(new_topic, 1, 1)
    missing = unique_name("gone")
    records = [dead_letter(orders if i < 5 or i >= 10 else missing, i) for i in range(15)]
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, records)

    with pytest.raises(TopicNotFoundError, match="does not exist"):
        await redrive(kafka_bootstrap, dlq)
    await asyncio.to_thread(create_topics, kafka_bootstrap, {missing: 1})
    report = await redrive(kafka_bootstrap, dlq)

    home = await asyncio.to_thread(read_all, kafka_bootstrap, orders, expected=10, idle=30, extra=1.0)
    assert sorted(m.key() for m in home) == sorted(b"k%d" % i for i in [*range(5), *range(10, 15)])
    assert len(await asyncio.to_thread(read_all, kafka_bootstrap, missing, expected=5, idle=30, extra=1.0)) == 5
    assert report.read == 15  # the failed run committed nothing


async def test_a_run_gives_up_after_max_aborts_transactions_aborted_in_a_row(kafka_bootstrap, new_topic, monkeypatch):
    dlq, orders = await topics(new_topic, 1, 1)
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter(orders, 1)])
    tried = []

    async def aborted(self, producer, consumer, reader) -> bool:
        tried.append(reader.checkpoint())
        return False  # the transaction aborted, its batch to be read again

    monkeypatch.setattr(redrive_module._Run, "_transaction", aborted)

    with pytest.raises(KafkaDLQError, match=f"^{MAX_ABORTS} transactions in a row aborted"):
        await redrive(kafka_bootstrap, dlq)
    assert len(tried) == MAX_ABORTS


async def test_at_least_once_mode_sends_every_selected_record(kafka_bootstrap, new_topic):
    dlq, orders = await topics(new_topic, 2, 1)
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(500)])
    report = await redrive(kafka_bootstrap, dlq, guarantee=Guarantee.AT_LEAST_ONCE)
    assert report.sent == Counter({orders: 500})
    home = await asyncio.to_thread(read_all, kafka_bootstrap, orders, expected=500)
    assert sorted(m.key() for m in home) == sorted(b"k%d" % i for i in range(500))
    assert (await redrive(kafka_bootstrap, dlq, guarantee=Guarantee.AT_LEAST_ONCE)).read == 0


HANDLER_KAFKA = {
    "auto.offset.reset": "latest",
    "group.id": "the-handlers-own-group",
    "enable.auto.commit": True,
    "isolation.level": "read_uncommitted",
    "acks": "1",
    "client.id": "ops",
}
"""A handler's [kafka] table as --config passes it on: settings for the handler's consumer, not a redrive's."""


@pytest.mark.parametrize("guarantee", list(Guarantee))
async def test_a_handlers_kafka_settings_do_not_change_how_a_run_reads_commits_or_sends(
    kafka_bootstrap, new_topic, guarantee, caplog
):
    dlq, orders = await topics(new_topic, 2, 1)
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(20)])

    # A deadline, not a timing assertion: with the handler's "latest", the run's new group started at the end and
    # waited there for ever.
    report = await asyncio.wait_for(
        redrive(kafka_bootstrap, dlq, guarantee=guarantee, kafka_config=HANDLER_KAFKA), timeout=120
    )

    assert report.sent == Counter({orders: 20})
    home = await asyncio.to_thread(read_all, kafka_bootstrap, orders, expected=20, idle=30, extra=1.0)
    assert sorted(m.key() for m in home) == sorted(b"k%d" % i for i in range(20))
    handlers = await asyncio.to_thread(committed_offsets, kafka_bootstrap, "the-handlers-own-group", dlq, 2)
    assert set(handlers.values()) == {-1001}  # the run committed in its own group only
    ignored = {r.getMessage().split("=")[0].removeprefix("ignoring Kafka setting ") for r in caplog.records}
    assert ignored >= set(HANDLER_KAFKA) - {"client.id"}


# ---------------------------------------------------------------- park and peek


async def test_park_copies_the_selected_dead_letters_to_the_poison_topic_with_reason_manual(kafka_bootstrap, new_topic):
    dlq, orders = await topics(new_topic, 2, 1)
    poison = f"{dlq}.poison"
    await asyncio.to_thread(create_topics, kafka_bootstrap, {poison: 1})
    records = [dead_letter(orders, i, error_class="KeyError" if i < 4 else "TimeoutError") for i in range(10)]
    records.append((None, b"\x00not a dead letter", [("h", b"1")]))
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, records)

    report = await park(kafka_bootstrap, dlq, select=RecordFilter(error_classes=("KeyError",)))
    everything = await park(kafka_bootstrap, dlq, poison_topic=poison, group="park-all")

    assert report.sent == Counter({poison: 4})
    assert everything.sent == Counter({poison: 11})
    parked = [
        as_record(m)
        for m in await asyncio.to_thread(read_all, kafka_bootstrap, poison, expected=15, idle=30, extra=1.0)
    ]
    decoded = [decode(r) for r in parked]
    letters = [d for d in decoded if isinstance(d, DeadLetter)]
    assert len(letters) == 14 and all(d.reason is Reason.MANUAL for d in letters)
    assert sorted(d.original.key for d in letters[:4]) == [b"k0", b"k1", b"k2", b"k3"]
    assert letters[0].original.headers == (("seq", letters[0].original.key[1:]), ("traceparent", b"00-abc-01"))
    raw = [r for r in parked if r.value == b"\x00not a dead letter"]
    assert len(raw) == 1 and raw[0].header("dlq.reason") == b"manual" and raw[0].header("h") == b"1"

    # The poison topic ends with transaction markers, never delivered: a redrive from it still finds its end.
    back = await asyncio.wait_for(redrive(kafka_bootstrap, poison, to=orders), 60)
    assert back.sent == Counter({orders: 14}) and back.refused == Counter({"undecodable": 1})


async def test_peek_shows_decoded_metadata_json_values_as_json_and_other_bytes_escaped(kafka_bootstrap, new_topic):
    dlq, orders = await topics(new_topic, 1, 1)
    records = [
        dead_letter(orders, 0, value=b'{"order": 1, "items": [1, 2]}'),
        dead_letter(orders, 1, value=b"\x1b[31mred\x00\xff"),
        dead_letter(orders, 2, error_class="KeyError"),
        (b"junk", b"plain text, no metadata", []),
    ]
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, records)

    found = await peek(kafka_bootstrap, dlq, select=RecordFilter(error_classes=("TimeoutError",)))
    everything = await peek(kafka_bootstrap, dlq, limit=3)

    assert [v["offset"] for v in found.records] == [0, 1] and found.scanned == 4
    first, second = found.records
    assert first["value"] == {"order": 1, "items": [1, 2]} and first["value_format"] == "json"
    assert second["value"] == "\\x1b[31mred\\x00\\xff" and second["value_format"] == "text"
    assert first["original"]["topic"] == orders and first["error"]["class"] == "builtins.TimeoutError"
    assert (first["attempts"], first["redrive_count"], first["group"]) == (3, 0, "orders-service")
    assert first["headers"] == [["seq", "0"], ["traceparent", "00-abc-01"]]
    assert len(everything.records) == 3  # --limit
    json.dumps(found.to_json())  # one JSON document, whatever the bytes
    last = (await peek(kafka_bootstrap, dlq, select=RecordFilter(first_offset=3))).records
    assert last[0]["undecodable"].startswith("unknown format") and last[0]["value"] == "plain text, no metadata"


# ---------------------------------------------------------------- the command line


def _commands(command: typer.core.TyperGroup, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, sub in command.commands.items():
        yield (*path, name)
        if isinstance(sub, typer.core.TyperGroup):
            yield from _commands(sub, (*path, name))


def test_every_command_and_subcommand_has_an_example_in_its_help():
    runner = CliRunner()
    commands = list(_commands(typer.main.get_command(app)))
    assert {("peek",), ("redrive",), ("stats",), ("pending", "drop"), ("dev", "up")} <= set(commands)
    for path in commands:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        example = re.search(r"Example: .*\bkafka-dlq " + re.escape(" ".join(path)) + r"\b", result.output)
        assert result.exit_code == 0 and example, f"kafka-dlq {' '.join(path)} --help:\n{result.output}"


def test_commands_read_kafka_from_the_environment_and_print_one_json_document(kafka_bootstrap, new_topic):
    dlq, orders = new_topic(1), new_topic(1)
    seed(kafka_bootstrap, dlq, [dead_letter(orders, i, error_class="KeyError" if i % 2 else "X") for i in range(6)])
    runner = CliRunner()
    env = {"KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap}

    peeked = runner.invoke(app, ["peek", dlq, "--limit", "2", "--json"], env=env)
    dry = runner.invoke(app, ["redrive", dlq, "--error-class", "KeyError", "--dry-run", "--json"], env=env)
    parked = runner.invoke(app, ["park", dlq, "--json", "--offsets", "0-1", "--poison-topic", orders, "--yes"], env=env)
    refused = runner.invoke(app, ["park", dlq], env=env)  # no terminal to confirm on
    nowhere = runner.invoke(app, ["peek", dlq], env={"KAFKA_DLQ_BOOTSTRAP_SERVERS": ""})

    assert peeked.exit_code == 0 and len(json.loads(peeked.stdout)["records"]) == 2
    assert dry.exit_code == 0 and json.loads(dry.stdout)["sent"] == {orders: 3}
    assert parked.exit_code == 0 and json.loads(parked.stdout)["sent"] == {orders: 2}
    assert refused.exit_code == 1 and "--yes" in refused.output
    assert nowhere.exit_code == 1 and "KAFKA_DLQ_BOOTSTRAP_SERVERS" in nowhere.output


CLEAN_ENV = dict.fromkeys(
    [
        "KAFKA_DLQ_CONFIG",
        "KAFKA_DLQ_BOOTSTRAP_SERVERS",
        "KAFKA_DLQ_KAFKA_CONFIG",
        "KAFKA_DLQ_REDIS_URL",
        "KAFKA_DLQ_NAME",
    ]
)
"""Every connection variable unset: the settings come from where each test says."""


def run_config(path, bootstrap: str, topic: str, kafka: str = "") -> str:
    """A ``kafka-dlq run`` config file at ``path`` for a handler of ``topic``; ``kafka``: its [kafka] table's lines."""
    path.write_text(
        f'name = "billing"\ntopics = ["{topic}"]\nbootstrap_servers = "{bootstrap}"\n'
        f'redis_url = "redis://127.0.0.1:1/0"\n\n[kafka]\n{kafka}\n'
    )
    return str(path)


def test_peek_redrive_and_park_take_kafka_from_the_config_file_and_flags_win(kafka_bootstrap, new_topic, tmp_path):
    dlq, orders = new_topic(1), new_topic(1)
    seed(kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(3)])
    good = run_config(tmp_path / "good.toml", kafka_bootstrap, dlq)
    broken = run_config(tmp_path / "broken.toml", kafka_bootstrap, dlq, kafka='"fetch.wait.max.ms" = "soon"')
    far = run_config(tmp_path / "far.toml", "127.0.0.1:9", dlq)  # nothing listens there
    runner = CliRunner()

    peeked = runner.invoke(app, ["peek", dlq, "--config", good, "--json"], env=CLEAN_ENV)
    dry = runner.invoke(app, ["redrive", dlq, "--dry-run", "--json"], env={**CLEAN_ENV, "KAFKA_DLQ_CONFIG": good})
    flag_wins = runner.invoke(app, ["peek", dlq, "-c", far, "--bootstrap", kafka_bootstrap, "--json"], env=CLEAN_ENV)
    env_wins = runner.invoke(
        app, ["peek", dlq, "-c", far, "--json"], env={**CLEAN_ENV, "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    )
    file_settings = runner.invoke(
        app, ["park", dlq, "--config", broken, "--poison-topic", orders, "--yes"], env=CLEAN_ENV
    )
    parked = runner.invoke(
        app,
        ["park", dlq, "--config", broken, "-X", "fetch.wait.max.ms=100", "--poison-topic", orders, "--yes", "--json"],
        env=CLEAN_ENV,
    )
    missing = runner.invoke(app, ["peek", dlq, "--config", str(tmp_path / "none.toml")], env=CLEAN_ENV)

    for result in (peeked, flag_wins, env_wins):
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["records"]) == 3
    assert dry.exit_code == 0 and json.loads(dry.stdout)["sent"] == {orders: 3}
    assert file_settings.exit_code == 1 and "fetch.wait.max.ms" in file_settings.output  # the file's [kafka], applied
    assert parked.exit_code == 0 and json.loads(parked.stdout)["sent"] == {orders: 3}  # and -X over it
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_a_real_redrive_or_park_with_a_relative_time_needs_a_group_so_that_a_rerun_resumes(
    kafka_bootstrap, new_topic, unique_name
):
    dlq, orders = new_topic(1), new_topic(1)
    seed(kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(4)])
    runner = CliRunner()
    env = {"KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap}
    group = unique_name("replay")

    refused = runner.invoke(app, ["redrive", dlq, "--since", "1h", "--json"], env=env)
    refused_park = runner.invoke(app, ["park", dlq, "--until", "1m", "--poison-topic", orders, "--yes"], env=env)
    dry = runner.invoke(app, ["redrive", dlq, "--since", "1h", "--dry-run", "--json"], env=env)
    first = runner.invoke(app, ["redrive", dlq, "--since", "1h", "--group", group, "--json"], env=env)
    rerun = runner.invoke(app, ["redrive", dlq, "--since", "1h", "--group", group, "--json"], env=env)

    for result in (refused, refused_park):
        assert result.exit_code == 1, result.output
        assert "is relative to now" in result.output and "--group NAME" in result.output
        assert "absolute time" in result.output
    assert dry.exit_code == 0 and json.loads(dry.stdout)["sent"] == {orders: 4}
    assert first.exit_code == 0 and json.loads(first.stdout)["sent"] == {orders: 4}
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["sent"] == {}  # an hour ago is later now: same group
    # The refused runs sent nothing: the 4 of the first run, and no more (a little read past them to see).
    assert len(read_all(kafka_bootstrap, orders, expected=4, idle=30, extra=1.0)) == 4


def test_a_real_redrive_or_park_in_the_handlers_own_group_is_refused(kafka_bootstrap, new_topic, tmp_path):
    dlq, orders = new_topic(1), new_topic(1)
    seed(kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(2)])
    config = run_config(tmp_path / "run.toml", kafka_bootstrap, dlq)  # the handler "billing": kafka-dlq-billing
    runner = CliRunner()

    by_file = runner.invoke(app, ["redrive", dlq, "-c", config, "--group", "kafka-dlq-billing"], env=CLEAN_ENV)
    by_name = runner.invoke(
        app,
        ["park", dlq, "--group", "kafka-dlq-orders", "--poison-topic", orders, "--yes"],
        env={**CLEAN_ENV, "KAFKA_DLQ_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_DLQ_NAME": "orders"},
    )
    dry = runner.invoke(
        app, ["redrive", dlq, "-c", config, "--group", "kafka-dlq-billing", "--dry-run", "--json"], env=CLEAN_ENV
    )

    for result in (by_file, by_name):
        assert result.exit_code == 1, result.output
        assert "the handler's own consumer group" in result.output
    assert dry.exit_code == 0 and json.loads(dry.stdout)["sent"] == {orders: 2}  # a dry run commits nothing
    assert read_all(kafka_bootstrap, orders, idle=1.0) == []


@pytest.mark.slow
def test_a_redrive_killed_three_times_then_run_to_the_end_delivers_each_record_exactly_once(kafka_bootstrap, new_topic):
    total = 100_000
    dlq, orders = new_topic(3), new_topic(3)
    chosen = {i for i in range(total) if i % 3}  # two in three are selected; the others' offsets commit too
    seed(
        kafka_bootstrap,
        dlq,
        (
            dead_letter(orders, i, error_class="builtins.TimeoutError" if i in chosen else "KeyError", pad=60)
            for i in range(total)
        ),
    )
    select = ["--error-class", "TimeoutError"]
    group = default_group(Action.REDRIVE, dlq, RecordFilter(error_classes=("TimeoutError",)), None, 3)
    command = [sys.executable, "-m", "kafka_dlq", "redrive", dlq, *select, "--bootstrap", kafka_bootstrap, "--json"]
    rng = random.Random(20240501)
    started = time.monotonic()

    def handled() -> int:
        return sum(max(0, o) for o in committed_offsets(kafka_bootstrap, group, dlq, 3).values())

    for kill in range(1, 4):
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        # Each run makes progress (a quarter of the records more), then dies at a random moment.
        while handled() < kill * total // 4 and run.poll() is None and time.monotonic() - started < 90:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        assert run.poll() is None, f"run {kill} ended before it was killed: {run.stderr.read()!r}"  # type: ignore[union-attr]
        run.send_signal(signal.SIGKILL)
        run.wait()
        run.stderr.close()  # type: ignore[union-attr]
    final = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert final.returncode == 0, final.stderr.decode()
    report = json.loads(final.stdout)

    home = read_all(kafka_bootstrap, orders)  # read_committed
    written = read_all(kafka_bootstrap, orders, isolation="read_uncommitted")
    print(
        f"\nkilled 3 times, then finished: {time.monotonic() - started:.1f} s; last run sent {report['sent']}; "
        f"{len(written) - len(home)} records of the killed runs' open transactions aborted"
    )
    assert len(written) > len(home)  # the kills did cut transactions short, with records already on the broker
    seqs = Counter(int(dict(m.headers())["seq"]) for m in home)
    duplicates = [seq for seq, n in seqs.items() if n > 1]
    assert not duplicates, f"{len(duplicates)} records arrived twice, e.g. {duplicates[:5]}"
    assert set(seqs) == chosen, f"missing {len(chosen - set(seqs))}, unexpected {len(set(seqs) - chosen)}"
    for msg in home:  # record by record: the original key, value and headers, redriven once
        seq = int(dict(msg.headers())["seq"])
        assert (msg.key(), msg.value()) == (b"k%d" % seq, b'{"i": %d}' % seq + b" " * 60)
        assert msg.headers() == [
            ("seq", b"%d" % seq),
            ("traceparent", b"00-abc-01"),
            *HISTORY,
            ("dlq.redrive.count", b"1"),
        ]


# ---------------------------------------------------------------- the benchmark


def test_the_redrive_benchmark_runs_on_small_inputs_and_reports_its_fields(kafka_bootstrap, monkeypatch):
    from kafka_dlq.bench import BenchOptions
    from kafka_dlq.bench import redrive as bench

    options = BenchOptions(bootstrap_servers=kafka_bootstrap, records=300, size=64, partitions=2)
    report = bench.run(options).to_json()

    assert report["name"] == "redrive" and report["records"] == 300
    assert report["records_per_second"] > 0 and report["baseline_records_per_second"] > 0 and report["ratio"] > 0
    assert set(report["loop_lag_ms"]) >= {"p50", "p99", "max"}
    assert {"exactly-once", "at-least-once"} <= set(report["cases"])
    assert 0 < report["rate"]["of_limit"] <= 1.0
    assert ("exactly-once vs kcat" in report["cases"]) == (shutil.which("kcat") is not None)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench._kcat(options, "any", "other").startswith("skipped: kcat is not installed")
