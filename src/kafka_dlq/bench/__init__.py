"""``kafka-dlq bench NAME``: what a part of kafka-dlq does on the user's own cluster, next to a plain baseline.

Each benchmark is a module with ``run(options: BenchOptions) -> BenchReport``, named in :data:`BENCHES`. Absolute
figures on shared machines move from run to run, so a benchmark measures the project's code and a plain baseline in
the same run, on the same data, and reports the ratio. The helpers here are what every benchmark shares: options,
uniquely named topics created and deleted, a stopwatch, a stall guard, loop-lag sampling, and the report with its
JSON and table forms.

To add a benchmark: write ``kafka_dlq/bench/NAME.py`` with ``run(options) -> BenchReport`` (create topics with
:class:`BenchTopics`, time with :class:`Stopwatch`, run the project's side under a :class:`LoopWatch`, one
:class:`Case` per thing measured) and add a line to :data:`BENCHES`; the CLI, JSON and table come with it.

While a benchmark runs, the objects alive before it started (the imported modules, above all) are frozen out of
the garbage collector's way (``gc.freeze()``), for the project's code and the baseline alike: the collector's
full passes then walk what the run itself keeps alive, which is what the loop-lag figure should answer for.

>>> options = BenchOptions(bootstrap_servers="127.0.0.1:19092", records=20_000)  # doctest: +SKIP
>>> report = run_bench("client", options)  # doctest: +SKIP
>>> report.to_json()["ratio"]  # doctest: +SKIP
0.93
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

from rich.table import Table

from kafka_dlq.errors import ConfigError, KafkaDLQError
from kafka_dlq.kafka.admin import create_topics, delete_topics
from kafka_dlq.loop_lag import LoopLagProbe

__all__ = [
    "BENCHES",
    "BenchOptions",
    "BenchReport",
    "BenchSpec",
    "BenchTopics",
    "Case",
    "LoopWatch",
    "StallGuard",
    "Stopwatch",
    "Timing",
    "client_settings",
    "find_bench",
    "render_table",
    "round_ratio",
    "run_bench",
    "unique_name",
]

log = logging.getLogger("kafka_dlq.bench")


def _quiet(step: str) -> None:
    pass


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What a benchmark runs against and how much it sends."""

    bootstrap_servers: str
    redis_url: str | None = None
    """For benchmarks that use the Redis schedule; None when the user gave no Redis."""
    records: int = 100_000
    size: int = 1024
    """Value size of each record, in bytes."""
    partitions: int = 3
    """Partitions of every topic the benchmark creates (the same for the project's code and the baseline)."""
    client_config: Mapping[str, str] = field(default_factory=dict)
    """librdkafka settings for every client the benchmark measures, the project's and the baseline's alike."""
    rounds: int = 1
    """How many times a benchmark that repeats (``client``) runs each case, both sides; it reports the median round."""
    progress: Callable[[str], None] = _quiet
    """Told which step starts ("produce: bare"), for a status line; never writes to stdout itself."""

    def __post_init__(self) -> None:
        if self.records < 1:
            raise ConfigError(f"--records must be at least 1 (got {self.records})")
        if self.size < 0:
            raise ConfigError(f"--size must be 0 or more bytes (got {self.size})")
        if self.partitions < 1:
            raise ConfigError(f"--partitions must be at least 1 (got {self.partitions})")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1 (got {self.rounds})")


@dataclass(frozen=True)
class BenchSpec:
    """Where a benchmark lives (a module with ``run(options) -> BenchReport``) and what it measures."""

    module: str
    summary: str


BENCHES: dict[str, BenchSpec] = {
    "client": BenchSpec(
        "kafka_dlq.bench.client",
        "the Kafka client layer (produce, consume, copy) against a bare synchronous confluent-kafka loop",
    ),
    "handler": BenchSpec(
        "kafka_dlq.bench.handler",
        "the DLQ handler pipeline (consume, schedule, process, recover) against the plain one-at-a-time loop it "
        "replaces",
    ),
    "consumer": BenchSpec(
        "kafka_dlq.bench.consumer",
        "the retrying consumer with a no-op handler (and with 1% failing) against a bare confluent-kafka consume loop",
    ),
    "redrive": BenchSpec(
        "kafka_dlq.bench.redrive",
        "operator redrive, exactly once and at least once, against a bare confluent-kafka copy loop and kcat",
    ),
}
"""Benchmark name to its module. Modules are imported only when run, so the CLI starts fast and a benchmark
module may import these helpers without a cycle."""


def find_bench(name: str) -> BenchSpec:
    """The benchmark called ``name``; a ConfigError naming the known ones when there is none."""
    spec = BENCHES.get(name)
    if spec is None:
        raise ConfigError(f"unknown benchmark {name!r}: choose one of {', '.join(sorted(BENCHES))}")
    return spec


def run_bench(name: str, options: BenchOptions) -> BenchReport:
    """Run benchmark ``name``; a ConfigError naming the known benchmarks when there is no such one.

    Blocking: it runs its own event loops where it needs them, so call it from synchronous code (the CLI).
    """
    spec = find_bench(name)
    runner = cast(Callable[[BenchOptions], BenchReport], importlib.import_module(spec.module).run)
    gc.collect()
    gc.freeze()
    try:
        report = runner(options)
    finally:
        gc.unfreeze()
    return report


def client_settings(options: BenchOptions) -> dict[str, Any]:
    """The settings every Kafka client of a benchmark starts from: the brokers and ``options.client_config``."""
    return {"bootstrap.servers": options.bootstrap_servers, **options.client_config}


def unique_name(bench: str, role: str) -> str:
    """A topic or group name no other run uses: ``kafka-dlq-bench-client-copy-1a2b3c4d``."""
    return f"kafka-dlq-bench-{bench}-{role}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """``records`` went through in ``seconds``."""

    records: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


class Stopwatch:
    """Wall-clock time from the first ``start()`` to ``stop()``.

    ``start()`` may be called on every batch: only the first call counts, so a consumer's clock starts at its first
    record and group join time (a broker setting, the same for every client) stays out of the figure.
    """

    def __init__(self) -> None:
        self._started: float | None = None

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def stop(self, records: int) -> Timing:
        if self._started is None:
            raise KafkaDLQError("the benchmark's stopwatch was never started")
        return Timing(records, time.perf_counter() - self._started)


class StallGuard:
    """Ends a run that stops making progress, with a message, instead of letting it hang on a broken cluster."""

    def __init__(self, what: str, total: int, seconds: float = 60.0) -> None:
        self.what = what
        self.total = total
        self.seconds = seconds
        self._count = -1
        self._since = time.monotonic()

    def check(self, count: int) -> None:
        """Call often with the records done so far; raises KafkaDLQError after ``seconds`` without a change."""
        now = time.monotonic()
        if count != self._count:
            self._count, self._since = count, now
        elif now - self._since > self.seconds:
            raise KafkaDLQError(
                f"{self.what}: no progress for {self.seconds:.0f} s at {count} of {self.total} records; "
                "check that the broker is up and the topics exist (the broker log says more)"
            )


class LoopWatch:
    """Watches the event loop while the project's code runs: how late it wakes, and the full garbage collections.

    One watch may cover several runs, each in its own event loop (``async with watch:`` in each); the figures add
    up. A full collection stops every thread for as long as it walks the live objects, so it shows in the loop lag
    without being a blocking call: ``gc_summary`` says how much of the lag it explains.

    >>> watch = LoopWatch()
    >>> async def case() -> None:  # doctest: +SKIP
    ...     async with watch:
    ...         await work()
    >>> watch.lag_summary()["p99"]  # doctest: +SKIP
    2.4
    """

    def __init__(self) -> None:
        self.probe = LoopLagProbe()
        self.gc_pauses_ms: list[float] = []
        self._gc_started = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses_ms.append((time.perf_counter() - self._gc_started) * 1000.0)

    async def __aenter__(self) -> LoopWatch:
        self.probe.start()
        gc.callbacks.append(self._on_gc)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        gc.callbacks.remove(self._on_gc)
        await self.probe.stop()

    def lag_summary(self) -> dict[str, float]:
        """``samples``, ``p50``, ``p99``, ``max`` of the loop lag, in milliseconds."""
        return self.probe.summary()

    def gc_summary(self) -> dict[str, float]:
        """Full collections while watched: how many, and the longest and total pause in milliseconds."""
        pauses = self.gc_pauses_ms
        return {
            "full_collections": float(len(pauses)),
            "max_ms": round(max(pauses, default=0.0), 2),
            "total_ms": round(sum(pauses), 2),
        }

    @classmethod
    def merged(cls, watches: Sequence[LoopWatch]) -> LoopWatch:
        """One watch holding the samples of several (the lag over every case of a benchmark)."""
        out = cls()
        for watch in watches:
            out.probe.samples_ms.extend(watch.probe.samples_ms)
            out.probe.max_ms = max(out.probe.max_ms, watch.probe.max_ms)
            out.gc_pauses_ms.extend(watch.gc_pauses_ms)
        return out


# ---------------------------------------------------------------- topics


class BenchTopics:
    """Uniquely named topics for one run, created on entry and deleted on exit; ``with`` or ``async with``.

    >>> with BenchTopics("127.0.0.1:19092", "client", ["source", "copy"], partitions=3) as topics:  # doctest: +SKIP
    ...     produce_to(topics["source"])
    """

    def __init__(self, bootstrap_servers: str, bench: str, roles: Sequence[str], *, partitions: int) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.partitions = partitions
        self.names = {role: unique_name(bench, role) for role in roles}
        self._created = False

    def __getitem__(self, role: str) -> str:
        return self.names[role]

    def create(self) -> None:
        self._created = True  # a partial failure may have created some: delete them all on the way out
        create_topics(self.bootstrap_servers, dict.fromkeys(self.names.values(), self.partitions))

    def delete(self) -> None:
        if not self._created:
            return
        try:
            delete_topics(self.bootstrap_servers, list(self.names.values()))
        except KafkaDLQError as exc:  # the figures are still good; say what to clean up
            log.warning("could not delete the benchmark's topics %s: %s", sorted(self.names.values()), exc)

    def __enter__(self) -> BenchTopics:
        try:
            self.create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()

    async def __aenter__(self) -> BenchTopics:
        await asyncio.to_thread(self.__enter__)  # admin calls wait on the network: never on the loop
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.delete)


# ---------------------------------------------------------------- the report


@dataclass(frozen=True, kw_only=True)
class Case:
    """One measured case: the project's code and, where there is one, the baseline, on the same records."""

    name: str
    ours: Timing
    baseline: Timing | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline.per_second <= 0:
            return None
        return self.ours.per_second / self.baseline.per_second

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records": self.ours.records,
            "seconds": round(self.ours.seconds, 3),
            "records_per_second": round(self.ours.per_second, 1),
        }
        if self.baseline is not None:
            out["baseline_seconds"] = round(self.baseline.seconds, 3)
            out["baseline_records_per_second"] = round(self.baseline.per_second, 1)
            out["ratio"] = round_ratio(self.ratio)
        return out


def round_ratio(ratio: float | None) -> float | None:
    return None if ratio is None else round(ratio, 3)


@dataclass(kw_only=True)
class BenchReport:
    """What a benchmark found; ``headline`` names the case whose figures lead (``records_per_second``, ``ratio``).

    ``to_json()`` is the ``--json`` document: ``name``, ``records``, ``records_per_second``, and where a baseline
    runs ``baseline`` (what it was), ``baseline_records_per_second`` and ``ratio``; ``loop_lag_ms`` (``p50``,
    ``p99``, ``max``) where the event loop was measured; then ``cases`` and ``extra``.
    """

    name: str
    records: int
    size: int
    cases: list[Case]
    headline: str
    baseline: str | None = None
    loop: LoopWatch | None = None
    """The loop while the project's code ran, where the benchmark watched it."""
    extra: dict[str, Any] = field(default_factory=dict)

    def case(self, name: str) -> Case:
        for case in self.cases:
            if case.name == name:
                return case
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        lead = self.case(self.headline)
        out: dict[str, Any] = {
            "name": self.name,
            "records": self.records,
            "size": self.size,
            "headline": self.headline,
            "records_per_second": round(lead.ours.per_second, 1),
        }
        if lead.baseline is not None:
            out["baseline"] = self.baseline
            out["baseline_records_per_second"] = round(lead.baseline.per_second, 1)
            out["ratio"] = round_ratio(lead.ratio)
        if self.loop is not None:
            out["loop_lag_ms"] = self.loop.lag_summary()
            out["gc"] = self.loop.gc_summary()
        out["cases"] = {case.name: case.to_json() for case in self.cases}
        out.update(self.extra)
        return out


def render_table(report: BenchReport) -> Table:
    """The report as a rich table: one row per case, then the loop lag."""
    has_baseline = any(case.baseline is not None for case in report.cases)
    table = Table(
        title=f"kafka-dlq bench {report.name}: {report.records:,} records of {report.size:,} bytes",
        caption=f"baseline: {report.baseline}" if report.baseline else None,
    )
    table.add_column("case")
    table.add_column("ours (records/s)", justify="right")
    if has_baseline:
        table.add_column("baseline (records/s)", justify="right")
        table.add_column("ratio", justify="right")
    for case in report.cases:
        label = f"[bold]{case.name}[/]" if case.name == report.headline else case.name
        row = [label, f"{case.ours.per_second:,.0f}"]
        if has_baseline:
            ratio = case.ratio
            row += [
                "" if case.baseline is None else f"{case.baseline.per_second:,.0f}",
                "" if ratio is None else f"{ratio:.2f}",
            ]
        table.add_row(*row)
    if report.loop is not None:
        lag, pauses = report.loop.lag_summary(), report.loop.gc_summary()
        table.add_section()
        blank = [""] * (2 if has_baseline else 0)
        table.add_row("loop lag (ms)", f"p50 {lag['p50']:.2f}  p99 {lag['p99']:.2f}  max {lag['max']:.2f}", *blank)
        full = int(pauses["full_collections"])
        table.add_row("full GC passes", f"{full}, longest {pauses['max_ms']:.1f} ms", *blank)
    return table
