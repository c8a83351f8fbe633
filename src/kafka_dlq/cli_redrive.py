"""``kafka-dlq peek``, ``redrive`` and ``park``: look at dead letters, send them home, or park them.

The commands register on the main typer app when this module is imported (``kafka_dlq.cli`` does, at its end).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kafka_dlq.cli import JsonOption, _emit, _fail, app, console
from kafka_dlq.cli_inspect import ConfigOption, file_settings
from kafka_dlq.errors import ConfigError, KafkaDLQError
from kafka_dlq.filters import RecordFilter, check_resumable, parse_header, parse_offsets, parse_time
from kafka_dlq.redrive import DEFAULT_MAX_REDRIVES, Guarantee, PeekReport, RunReport, park, peek, redrive

T = TypeVar("T")

# ---------------------------------------------------------------- options shared by the three commands

TopicArgument = Annotated[str, typer.Argument(help="The dead-letter topic (or a poison topic) to read.")]
BootstrapOption = Annotated[
    str | None,
    typer.Option("--bootstrap", envvar="KAFKA_DLQ_BOOTSTRAP_SERVERS", help="Kafka's bootstrap.servers."),
]
KafkaOption = Annotated[
    list[str] | None,
    typer.Option(
        "--kafka",
        "-X",
        envvar="KAFKA_DLQ_KAFKA_CONFIG",
        help="An extra librdkafka setting KEY=VALUE (security.protocol=SASL_SSL, ...); repeat for more.",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Dead letters written at or after: ISO-8601, epoch s or ms, or a duration ago (2h; a real redrive or "
        "park takes a duration only with --group, so that a rerun resumes).",
        rich_help_panel="Filters",
    ),
]
UntilOption = Annotated[
    str | None, typer.Option(help="Dead letters written before (same forms as --since).", rich_help_panel="Filters")
]
PartitionOption = Annotated[
    list[int] | None, typer.Option("--partition", help="DLQ partition; repeat for more.", rich_help_panel="Filters")
]
OffsetsOption = Annotated[
    str | None,
    typer.Option(help="DLQ offsets, inclusive: FIRST-LAST, FIRST- or -LAST.", rich_help_panel="Filters"),
]
OriginalTopicOption = Annotated[
    list[str] | None,
    typer.Option("--original-topic", help="Topic the record failed on; repeat for more.", rich_help_panel="Filters"),
]
ErrorClassOption = Annotated[
    list[str] | None,
    typer.Option(
        "--error-class",
        help="Error class, qualified (builtins.KeyError) or not (KeyError); repeat for more.",
        rich_help_panel="Filters",
    ),
]
ErrorPatternOption = Annotated[
    str | None,
    typer.Option(
        help="Regular expression searched in the error class and message (any case).", rich_help_panel="Filters"
    ),
]
KeyOption = Annotated[
    list[str] | None, typer.Option("--key", help="Original key (UTF-8); repeat for more.", rich_help_panel="Filters")
]
HeaderOption = Annotated[
    list[str] | None,
    typer.Option(
        "--header", help="NAME=VALUE, or NAME for any value; repeat: all must match.", rich_help_panel="Filters"
    ),
]
GroupOption = Annotated[
    str | None,
    typer.Option(
        help="Consumer group of the run; by default one per topic, filter and destination (reruns resume). "
        "Needed with a relative --since or --until (2h), which names another range each run."
    ),
]
RateOption = Annotated[float | None, typer.Option(help="Records sent per second, at most.")]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Send nothing: count per destination, with samples; commits nothing.")
]
GuaranteeOption = Annotated[
    Guarantee, typer.Option(help="exactly-once (transactions) or at-least-once (no transactions; may repeat).")
]
SampleOption = Annotated[int, typer.Option(help="Records shown by --dry-run.")]


def _connection(bootstrap: str | None, kafka: list[str] | None, config_file: str | None) -> tuple[str, dict[str, Any]]:
    """Kafka's servers and settings: flags (or their KAFKA_DLQ_* variables) over the config file's."""
    found = file_settings(config_file)
    bootstrap = bootstrap or found.bootstrap_servers
    if not bootstrap:
        raise ConfigError(
            "no Kafka to talk to: pass --bootstrap HOST:PORT, set KAFKA_DLQ_BOOTSTRAP_SERVERS or give --config FILE "
            '(for the dev stack: eval "$(kafka-dlq dev status --env)")'
        )
    settings = dict(found.kafka)
    for item in kafka or []:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise ConfigError(f"--kafka {item!r}: write KEY=VALUE, e.g. -X security.protocol=SASL_SSL")
        settings[name] = value
    return bootstrap, settings


def _not_the_handlers(group: str | None, config_file: str | None) -> None:
    """Refuse, for a real run, the consumer group of the handler that --config or KAFKA_DLQ_* names: the run would
    join the handler's group and commit its offsets."""
    if group is None:
        return
    from kafka_dlq.config import load_connection

    found = load_connection(config_file)
    if group == found.handler_group:
        raise ConfigError(
            f"--group {group!r} is the handler's own consumer group: a real run would join it and commit the "
            "handler's offsets. Name another group, or leave --group out for the run's own"
        )


def _selection(
    since: str | None,
    until: str | None,
    partition: list[int] | None,
    offsets: str | None,
    original_topic: list[str] | None,
    error_class: list[str] | None,
    error_pattern: str | None,
    key: list[str] | None,
    header: list[str] | None,
) -> RecordFilter:
    now_ms = int(time.time() * 1000)
    first, last = parse_offsets(offsets) if offsets else (None, None)
    return RecordFilter(
        since=None if since is None else parse_time(since, now_ms=now_ms),
        until=None if until is None else parse_time(until, now_ms=now_ms),
        partitions=frozenset(partition or ()),
        first_offset=first,
        last_offset=last,
        original_topics=tuple(original_topic or ()),
        error_classes=tuple(error_class or ()),
        error_pattern=error_pattern,
        keys=tuple(k.encode() for k in key or ()),
        headers=tuple(parse_header(h) for h in header or ()),
    )


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coroutine)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        Console(stderr=True).print(
            "interrupted: what was committed stays committed; run the same command again to continue"
        )
        raise typer.Exit(130) from None


@contextmanager
def _progress(what: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on standard error with rate and ETA; ``None`` (no bar) when ``enabled`` is False."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} records/s"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(what, total=None, rate="-")

    def update(done: int, total: int) -> None:
        speed = bar.tasks[0].speed
        bar.update(task, completed=done, total=total or None, rate="-" if speed is None else f"{speed:,.0f}")

    with bar:
        yield update
        if bar.tasks[0].total is not None:  # offsets of transaction markers count, but no record is read there
            bar.update(task, completed=bar.tasks[0].total)


# ---------------------------------------------------------------- text output


def _peek_text(report: PeekReport) -> Text:
    out = Text()
    for view in report.records:
        out.append(f"{view['dlq']}", style="bold")
        out.append(f"  {view['timestamp']}  {view['format'] or 'unknown format'}\n")
        if "undecodable" in view:
            out.append(f"  undecodable: {view['undecodable']}\n", style="red")
        else:
            where = view["original"]
            error = view["error"]
            out.append(f"  from {where['topic']}/{where['partition']}/{where['offset']}")
            out.append(f"  attempts {view['attempts']}  redriven {view['redrive_count']}")
            out.append(f"  reason {view['reason']}\n" if view["reason"] else "\n")
            out.append(f"  error {error['class']}: {error['message']}\n", style="red")
        out.append(f"  key   {view['key']}\n")
        value = view["value"]
        shown = json.dumps(value, indent=2, ensure_ascii=False) if view["value_format"] == "json" else str(value)
        out.append("  value " + shown.replace("\n", "\n        ") + "\n")
        for name, data in view["headers"]:
            out.append(f"  header {name}={data}\n", style="dim")
        out.append("\n")
    out.append(f"{len(report.records)} matching of {report.scanned} read from {report.topic}")
    return out


def _run_text(report: RunReport) -> Table:
    verb = {"redrive": "redriven", "park": "parked"}[report.action.value]
    table = Table(title=f"{report.action.value} {report.topic}" + (" (dry run)" if report.dry_run else ""))
    table.add_column("would go to" if report.dry_run else "sent to")
    table.add_column("records", justify="right")
    for topic, count in sorted(report.sent.items()):
        table.add_row(topic, f"{count:,}")
    table.add_section()
    table.add_row("would be " + verb if report.dry_run else verb, f"{sum(report.sent.values()):,}")
    for kind, count in sorted(report.refused.items()):
        table.add_row(f"refused: {kind.replace('_', ' ')}", f"{count:,}", style="red")
    table.add_row("skipped (not selected)", f"{report.skipped:,}")
    table.add_row("read", f"{report.read:,}")
    if not report.dry_run and report.seconds > 0:
        table.add_row("sent per second", f"{report.records_per_second:,.0f}")
    return table


def _show_run(report: RunReport, as_json: bool) -> None:
    if as_json:
        _emit(report.to_json(), True, "")
        return
    console.print(_run_text(report))
    state = "nothing was sent or committed" if report.dry_run else f"{report.transactions} transactions committed"
    console.print(Text(f"{state}; group {report.group}", style="dim"))
    for refusal in report.refusals:
        console.print(Text(f"refused {refusal['dlq']}: {refusal['kind']}: {refusal['detail']}", style="red"))
    for view in report.samples:
        console.print(Text(f"sample {view['dlq']} -> {view['destination']}: key {view['key']}, value {view['value']}"))


# ---------------------------------------------------------------- the commands


@app.command("peek")
def peek_command(
    topic: TopicArgument,
    limit: Annotated[int, typer.Option(help="Records shown, at most.")] = 20,
    max_bytes: Annotated[int, typer.Option(help="Longer keys, values and headers are cut to this many bytes.")] = 4096,
    bootstrap: BootstrapOption = None,
    kafka: KafkaOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    partition: PartitionOption = None,
    offsets: OffsetsOption = None,
    original_topic: OriginalTopicOption = None,
    error_class: ErrorClassOption = None,
    error_pattern: ErrorPatternOption = None,
    key: KeyOption = None,
    header: HeaderOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show dead letters with their decoded metadata: the value as JSON when it is JSON, escaped when not.

    Reads the topic from its start (or the filter's first offset or time), read_committed, and commits nothing.

    Example: kafka-dlq peek orders.dlq --error-class TimeoutError --since 2h --limit 5
    """
    try:
        servers, settings = _connection(bootstrap, kafka, config_file)
        select = _selection(since, until, partition, offsets, original_topic, error_class, error_pattern, key, header)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    report = _run(peek(servers, topic, select=select, limit=limit, max_bytes=max_bytes, kafka_config=settings))
    if as_json:
        _emit(report.to_json(), True, "")
    else:
        console.print(_peek_text(report), soft_wrap=True)


@app.command("redrive")
def redrive_command(
    topic: TopicArgument,
    to: Annotated[str | None, typer.Option(help="Send here instead of each record's original topic.")] = None,
    dry_run: DryRunOption = False,
    rate: RateOption = None,
    max_redrives: Annotated[
        int, typer.Option(help="Loop guard: refuse a dead letter already redriven this many times.")
    ] = DEFAULT_MAX_REDRIVES,
    group: GroupOption = None,
    guarantee: GuaranteeOption = Guarantee.EXACTLY_ONCE,
    sample: SampleOption = 5,
    bootstrap: BootstrapOption = None,
    kafka: KafkaOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    partition: PartitionOption = None,
    offsets: OffsetsOption = None,
    original_topic: OriginalTopicOption = None,
    error_class: ErrorClassOption = None,
    error_pattern: ErrorPatternOption = None,
    key: KeyOption = None,
    header: HeaderOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send dead letters back to their original topic: original key, value and headers, attempts, redrive count + 1.

    Exactly once: killed at any point, the same command run again continues where it stopped.

    The run ends where the topic ended when it started. Dead letters redriven --max-redrives times are refused.

    Example: kafka-dlq redrive orders.dlq --error-class TimeoutError --since 2024-05-01T12:00Z --rate 500
    """
    try:
        servers, settings = _connection(bootstrap, kafka, config_file)
        select = _selection(since, until, partition, offsets, original_topic, error_class, error_pattern, key, header)
        if not dry_run:
            check_resumable({"--since": since, "--until": until}, group=group, now_ms=int(time.time() * 1000))
            _not_the_handlers(group, config_file)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    with _progress(f"redrive {topic}", not as_json) as progress:
        report = _run(
            redrive(
                servers,
                topic,
                select=select,
                to=to,
                group=group,
                rate=rate,
                max_redrives=max_redrives,
                guarantee=guarantee,
                dry_run=dry_run,
                sample=sample,
                kafka_config=settings,
                progress=progress,
            )
        )
    _show_run(report, as_json)


@app.command("park")
def park_command(
    topic: TopicArgument,
    poison_topic: Annotated[str | None, typer.Option(help="Where parked records go; default TOPIC.poison.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    dry_run: DryRunOption = False,
    rate: RateOption = None,
    group: GroupOption = None,
    guarantee: GuaranteeOption = Guarantee.EXACTLY_ONCE,
    sample: SampleOption = 5,
    bootstrap: BootstrapOption = None,
    kafka: KafkaOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    partition: PartitionOption = None,
    offsets: OffsetsOption = None,
    original_topic: OriginalTopicOption = None,
    error_class: ErrorClassOption = None,
    error_pattern: ErrorPatternOption = None,
    key: KeyOption = None,
    header: HeaderOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Copy dead letters to the poison topic with reason manual, exactly once; asks first unless --yes.

    Example: kafka-dlq park orders.dlq --original-topic payments --error-pattern "card declined" --yes
    """
    try:
        servers, settings = _connection(bootstrap, kafka, config_file)
        select = _selection(since, until, partition, offsets, original_topic, error_class, error_pattern, key, header)
        if not dry_run:
            check_resumable({"--since": since, "--until": until}, group=group, now_ms=int(time.time() * 1000))
            _not_the_handlers(group, config_file)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc

    def run(dry: bool, progress: Callable[[int, int], None] | None = None) -> RunReport:
        return _run(
            park(
                servers,
                topic,
                select=select,
                poison_topic=poison_topic,
                group=group,
                rate=rate,
                guarantee=guarantee,
                dry_run=dry,
                sample=sample,
                kafka_config=settings,
                progress=progress,
            )
        )

    if not dry_run and not yes:
        if not sys.stdin.isatty():
            raise _fail(ConfigError("park asks for confirmation: pass --yes to run it without a terminal"))
        preview = run(dry=True)
        count = sum(preview.sent.values())
        target = next(iter(preview.sent), poison_topic or f"{topic}.poison")
        if count == 0:
            _show_run(preview, as_json)
            return
        if not typer.confirm(f"Park {count:,} dead letters of {topic} in {target} (reason manual)?", err=True):
            raise typer.Exit(1)
    with _progress(f"park {topic}", not as_json and not dry_run) as progress:
        report = run(dry_run, progress)
    _show_run(report, as_json)
