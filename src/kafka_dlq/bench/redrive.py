"""``kafka-dlq bench redrive``: operator redrive against a bare confluent-kafka copy loop and ``kcat``.

One dead-letter topic of ``--records`` native dead letters (``--size`` byte values, printable, one line each, so
that ``kcat`` can pipe them), read by every case in the same run:

- ``exactly-once``: ``redrive`` as shipped (transactions, ``read_committed``, offsets in the transaction);
- ``at-least-once``: ``redrive`` with ``Guarantee.AT_LEAST_ONCE`` (offsets commit after deliveries);
- ``bare``, the baseline of both: a synchronous confluent-kafka loop copying key, value and headers as they are
  (at least once, no decoding, no transaction);
- ``kcat``: ``kcat -C ... | kcat -P ...`` piping the values to another topic (values only; skipped, with a note,
  when kcat is not installed: ``apt-get install kcat``);
- ``rate``: a rate-limited redrive, to show how close to its limit it stays (``of_limit``, never above 1).

``ratio`` is exactly-once redrive over the bare loop; ``loop_lag_ms`` is sampled during the exactly-once case.

>>> from kafka_dlq.bench import BenchOptions, run_bench
>>> run_bench("redrive", BenchOptions(bootstrap_servers="127.0.0.1:19092")).to_json()["ratio"]  # doctest: +SKIP
0.61
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

from kafka_dlq.bench import (
    BenchOptions,
    BenchReport,
    BenchTopics,
    Case,
    LoopWatch,
    Timing,
    client_settings,
    unique_name,
)
from kafka_dlq.bench.client import Settings, Workload, bare_copy, bare_produce
from kafka_dlq.errors import KafkaDLQError
from kafka_dlq.formats import encode_native
from kafka_dlq.kafka.inspect import end_offsets
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord
from kafka_dlq.redrive import Guarantee, redrive

__all__ = ["run"]

NAME = "redrive"
BASELINE = "bare confluent-kafka copy loop, synchronous, at least once (key, value and headers as they are)"
KCAT_TIMEOUT = 600.0
RATE_SECONDS = 2.0
"""The rate case runs about this long: ``min(records, 2000)`` records at half that many per second."""


def workload(records: int, size: int, home: str) -> Workload:
    """``records`` native dead letters of ``home`` with one printable ``size`` byte value (no newline, for kcat)."""
    value = (b'{"order": "' + b"x" * max(0, size - 13) + b'"}')[:size] if size >= 13 else b"x" * size
    encoded = encode_native(
        DeadLetter(
            original=OriginalRecord(
                topic=home,
                partition=0,
                offset=0,
                timestamp=1_714_564_800_000,
                value=value,
                headers=(("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),),
            ),
            failure=Failure(error_class="builtins.TimeoutError", message="read timed out", stacktrace="Traceback ..."),
            attempts=3,
            first_failure=1_714_564_800_000,
            last_failure=1_714_564_860_000,
            group="orders-service",
        )
    )
    return Workload([b"key-%08d" % i for i in range(records)], value, encoded.headers)


def run(options: BenchOptions) -> BenchReport:
    """Seed the dead letters, run every case on them, report; blocking (ours runs in its own event loop)."""
    bootstrap, records, settings = options.bootstrap_servers, options.records, Settings(client_settings(options))
    rate_records = min(records, 2000)
    rate_limit = max(1.0, rate_records / RATE_SECONDS)
    roles = ["dlq", "home", "exactly-once", "at-least-once", "bare", "kcat", "rate-dlq", "rate"]
    watch = LoopWatch()
    extra: dict[str, object] = {"partitions": options.partitions, "bootstrap_servers": bootstrap}
    with BenchTopics(bootstrap, NAME, roles, partitions=options.partitions) as topics:
        data = workload(records, options.size, topics["home"])
        options.progress("seed the dead-letter topics")
        bare_produce(settings, topics["dlq"], data)
        bare_produce(settings, topics["rate-dlq"], workload(rate_records, options.size, topics["home"]))

        options.progress("bare copy loop")
        bare = bare_copy(settings, topics["dlq"], topics["bare"], data)
        options.progress("exactly-once redrive")
        exactly = _ours(options, topics["dlq"], topics["exactly-once"], records, Guarantee.EXACTLY_ONCE, watch)
        options.progress("at-least-once redrive")
        at_least = _ours(options, topics["dlq"], topics["at-least-once"], records, Guarantee.AT_LEAST_ONCE)
        cases = [
            Case(name="exactly-once", ours=exactly, baseline=bare),
            Case(name="at-least-once", ours=at_least, baseline=bare),
        ]
        options.progress("kcat pipe")
        kcat = _kcat(options, topics["dlq"], topics["kcat"])
        if isinstance(kcat, Timing):
            cases.append(Case(name="exactly-once vs kcat", ours=exactly, baseline=kcat))
            extra["kcat"] = "kcat -C (values, -e) | kcat -P: values only, no keys or headers; process start included"
        else:
            extra["kcat"] = kcat
        options.progress(f"redrive at --rate {rate_limit:.0f}")
        limited = _ours(
            options, topics["rate-dlq"], topics["rate"], rate_records, Guarantee.EXACTLY_ONCE, rate=rate_limit
        )
        cases.append(Case(name=f"rate {rate_limit:.0f}/s", ours=limited))
        extra["rate"] = {
            "limit": rate_limit,
            "records": rate_records,
            "seconds": round(limited.seconds, 3),
            "records_per_second": round(limited.per_second, 1),
            "of_limit": round(limited.per_second / rate_limit, 4),
        }
    return BenchReport(
        name=NAME,
        records=records,
        size=options.size,
        cases=cases,
        headline="exactly-once",
        baseline=BASELINE,
        loop=watch,
        extra=extra,
    )


def _ours(
    options: BenchOptions,
    dlq: str,
    target: str,
    records: int,
    guarantee: Guarantee,
    watch: LoopWatch | None = None,
    rate: float | None = None,
) -> Timing:
    async def main() -> Timing:
        async with watch or LoopWatch():
            report = await redrive(
                options.bootstrap_servers,
                dlq,
                to=target,
                group=unique_name(NAME, guarantee.value),
                guarantee=guarantee,
                rate=rate,
                kafka_config=options.client_config,
            )
        sent = sum(report.sent.values())
        if sent != records:
            raise KafkaDLQError(f"redrive ({guarantee.value}) sent {sent} records, expected {records}")
        return Timing(sent, report.seconds)

    return asyncio.run(main())


def _kcat(options: BenchOptions, source: str, target: str) -> Timing | str:
    """Pipe every value of ``source`` to ``target`` through two kcat processes; a note when there is no kcat."""
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        return "skipped: kcat is not installed (Debian: apt-get install kcat)"
    records = options.records
    common = ["-b", options.bootstrap_servers, "-q"]
    for name, value in options.client_config.items():
        common += ["-X", f"{name}={value}"]
    started = time.perf_counter()
    consume = subprocess.Popen(
        [kcat, "-C", *common, "-t", source, "-o", "beginning", "-e", "-c", str(records)], stdout=subprocess.PIPE
    )
    produce = subprocess.Popen([kcat, "-P", *common, "-t", target], stdin=consume.stdout)
    assert consume.stdout is not None
    consume.stdout.close()  # the producer owns the pipe now: it sees end of input when the consumer exits
    try:
        produce.wait(KCAT_TIMEOUT)
        consume.wait(KCAT_TIMEOUT)
    except subprocess.TimeoutExpired:
        consume.kill()
        produce.kill()
        raise KafkaDLQError(f"kcat did not copy {records} records within {KCAT_TIMEOUT:.0f} s") from None
    seconds = time.perf_counter() - started
    ends = end_offsets(client_settings(options), [(target, p) for p in range(options.partitions)])
    copied = sum(ends.values())  # a new topic: its offsets start at 0
    if consume.returncode or produce.returncode or copied != records:
        raise KafkaDLQError(
            f"kcat copied {copied} of {records} records (exit codes {consume.returncode}, {produce.returncode})"
        )
    return Timing(copied, seconds)
