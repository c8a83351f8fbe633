"""``kafka-dlq stats``, ``pending`` (and its ``retry-now``, ``park``, ``drop``) and ``doctor``.

Registered on the main app by importing this module (``cli.py`` does, at its end). Connection settings come from
flags, ``KAFKA_DLQ_*`` environment variables or ``--config FILE`` (the TOML file of ``kafka-dlq run``), in that
order; ``--json`` prints one JSON document on standard output; progress goes to standard error, and only on a
terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kafka_dlq.cli import JsonOption, _emit, _fail, app, console
from kafka_dlq.errors import ConfigError, KafkaDLQError

if TYPE_CHECKING:  # the modules behind the commands load when a command runs: `kafka-dlq --help` stays quick
    from kafka_dlq.config import Connection
    from kafka_dlq.pending import ActionResult, PendingSummary, Selection

T = TypeVar("T")

BootstrapOption = Annotated[
    str | None,
    typer.Option("--bootstrap", envvar="KAFKA_DLQ_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers."),
]
RedisOption = Annotated[
    str | None, typer.Option("--redis-url", envvar="KAFKA_DLQ_REDIS_URL", help="The handler's Redis.")
]
NameOption = Annotated[
    str | None, typer.Option("--name", envvar="KAFKA_DLQ_NAME", help="The handler's name (its Redis keys, its group).")
]
KafkaSettingOption = Annotated[
    list[str] | None,
    typer.Option(
        "--kafka",
        "-X",
        envvar="KAFKA_DLQ_KAFKA_CONFIG",
        help="An extra librdkafka setting KEY=VALUE (security.protocol=SASL_SSL, ...); repeat for more.",
    ),
]


ConfigOption = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        envvar="KAFKA_DLQ_CONFIG",
        help="The handler's TOML file (kafka-dlq run's): Kafka, [kafka] settings, Redis, name and group from it, "
        "nothing else (its processors need not import). Flags and KAFKA_DLQ_* variables win over it.",
    ),
]


def file_settings(path: str | None) -> Connection:
    """What ``--config FILE`` gives (nothing without a file), ``KAFKA_DLQ_*`` variables over it: its connection
    settings only (:func:`kafka_dlq.config.load_connection`), so the file need not be complete and its processors
    need not import here. Flags then win over both (the caller's ``or``), and the caller checks what it needs.
    """
    from kafka_dlq.config import Connection, load_connection

    if path is None:
        return Connection()

    return load_connection(path)


def _kafka_config(
    bootstrap: str | None, settings: list[str] | None, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """librdkafka settings: ``base`` (a config file's ``[kafka]``), then ``-X`` settings, then the servers."""
    if not bootstrap:
        raise ConfigError(
            "no Kafka given: pass --bootstrap, set KAFKA_DLQ_BOOTSTRAP_SERVERS or give --config FILE (kafka-dlq run's)"
        )
    config: dict[str, Any] = {**(base or {}), "bootstrap.servers": bootstrap}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--kafka {item!r} is not KEY=VALUE (e.g. -X security.protocol=SSL)")
        config[key.strip()] = value
    return config


def _run(work: Coroutine[Any, Any, T]) -> T:
    # The clients' own log lines (a refused connection, again and again) would repeat what the command reports
    # itself, once and clearly. The levels are put back: the app may run commands in a process that logs.
    loggers = [logging.getLogger(name) for name in ("kafka_dlq.librdkafka", "kafka_dlq.kafka")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(work)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], object]]:
    """A progress bar on standard error (a terminal only); yields ``update(done, total)``."""
    err = Console(stderr=True)
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _when(ms: int | None, zone: bool = True) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S" + (" UTC" if zone else ""))


def _split(values: list[str] | None) -> list[str]:
    """Repeated options and comma lists alike (``--topic a --topic b`` or ``KAFKA_DLQ_TOPICS=a,b``)."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _counts(title: str, counts: dict[str, int], top: int) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column(title.removeprefix("by "))
    table.add_column("records", justify="right")
    for key, count in list(counts.items())[:top]:
        table.add_row(escape(key), str(count))
    if len(counts) > top:
        table.add_row(f"... {len(counts) - top} more (--top, --json)", "")
    return table


# ---------------------------------------------------------------- stats


@app.command("stats")
def stats_command(
    topics: Annotated[list[str], typer.Argument(help="Dead-letter or poison topic(s) to count.")],
    group: Annotated[
        str | None,
        typer.Option(
            envvar="KAFKA_DLQ_GROUP_ID", help="Consumer group for the lag (default: the handler's, by --name)."
        ),
    ] = None,
    name: NameOption = None,
    top: Annotated[int, typer.Option(help="Rows per table in the text output.")] = 15,
    bootstrap: BootstrapOption = None,
    kafka_setting: KafkaSettingOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Count what a DLQ holds: by original topic, error class, reason and format; failure times; lag per partition.

    Reads the topic(s) to their current end with no consumer group (nothing is committed) and reads only the headers
    it counts. The lag (the high watermark less the group's committed offset) shows with --group, --name or a
    --config naming the handler.

    Example: kafka-dlq stats payments.dlq --name billing --json
    """
    from kafka_dlq.stats import collect_stats

    try:
        found = file_settings(config_file)
        config = _kafka_config(bootstrap or found.bootstrap_servers, kafka_setting, found.kafka)
    except ConfigError as exc:
        raise _fail(exc) from exc
    if group is None:  # the handler's group, found as the handler finds it: its group_id, else from its name
        # Another handler than the file's (--name or KAFKA_DLQ_NAME): that handler's group.
        group = f"kafka-dlq-{name}" if name and name != found.name else found.handler_group
    with _progress(f"reading {', '.join(topics)}") as update:
        stats = _run(collect_stats(config, topics, group=group, progress=update))
    data = stats.to_json()
    if as_json:
        _emit(data, True, "")
        return
    console.print(
        f"[bold]{', '.join(topics)}[/]: {stats.records} record(s), {stats.undecodable} undecodable, "
        f"failures from {_when(stats.oldest_failure)} to {_when(stats.newest_failure)} "
        f"(read in {stats.seconds:.1f} s)",
        highlight=False,
    )
    groups = Table(title="by original topic and error class", title_justify="left", show_edge=False)
    groups.add_column("original topic")
    groups.add_column("error class", overflow="fold")
    groups.add_column("records", justify="right")
    groups.add_column("oldest failure (UTC)", no_wrap=True)
    groups.add_column("newest failure (UTC)", no_wrap=True)
    for row in stats.groups[:top]:
        groups.add_row(
            escape(row.original_topic or "(undecodable)"),
            escape(row.error_class or "(none)"),
            str(row.records),
            _when(row.oldest_failure, zone=False),
            _when(row.newest_failure, zone=False),
        )
    console.print(groups)
    console.print(_counts("by original topic", stats.by_original_topic, top))
    console.print(_counts("by error class", stats.by_error_class, top))
    if stats.by_reason:
        console.print(_counts("by reason", stats.by_reason, top))
    console.print(_counts("by format", stats.by_format, top))
    partitions = Table(title="partitions", title_justify="left", show_edge=False)
    for column in ("topic", "partition", "low", "high", "records", "committed", "lag"):
        partitions.add_column(column, justify="left" if column == "topic" else "right")
    for p in stats.partitions:
        partitions.add_row(
            escape(p.topic),
            str(p.partition),
            str(p.low),
            str(p.high),
            str(p.records),
            "-" if p.committed is None else str(p.committed),
            "-" if p.lag is None else str(p.lag),
        )
    console.print(partitions)
    if group:
        console.print(f"lag of group {escape(group)}: {data['lag']}", highlight=False)


def _config_or_fail(
    bootstrap: str | None, settings: list[str] | None, found: Connection | None = None
) -> dict[str, Any]:
    try:
        if found is None:
            return _kafka_config(bootstrap, settings, {})
        return _kafka_config(bootstrap or found.bootstrap_servers, settings, found.kafka)
    except ConfigError as exc:
        raise _fail(exc) from exc


# ---------------------------------------------------------------- pending

pending_app = typer.Typer(invoke_without_command=True)  # its help is the callback's docstring
app.add_typer(pending_app, name="pending")

IdOption = Annotated[list[str] | None, typer.Option("--id", help="Entry id, dlq-topic/partition/offset; repeatable.")]
TopicOption = Annotated[str | None, typer.Option("--topic", help="Only entries of this original topic.")]
ErrorOption = Annotated[
    str | None, typer.Option("--error-class", help="Only this error class; shell patterns work (*Timeout*).")
]
DlqTopicOption = Annotated[str | None, typer.Option("--dlq-topic", help="Only entries read from this DLQ topic.")]
StateOption = Annotated[str | None, typer.Option("--state", help="Only 'due' or 'in_flight' entries.")]
DueBeforeOption = Annotated[
    str | None,
    typer.Option("--due-before", help="Only entries due before: 'now', epoch ms or ISO-8601 (2024-05-01T12:00Z)."),
]
LimitOption = Annotated[int | None, typer.Option("--limit", help="At most this many entries, soonest due first.")]
AllOption = Annotated[bool, typer.Option("--all", help="Select every entry (needed when no id or filter is given).")]
NoteOption = Annotated[str | None, typer.Option("--note", help="Why: kept in the history (and, parking, the record).")]
ByOption = Annotated[
    str | None, typer.Option("--by", envvar="KAFKA_DLQ_OPERATOR", help="Who acts, for the history (default user@host).")
]


def _time(text: str | None) -> int | None:
    if text is None:
        return None
    if text == "now":
        return int(time.time() * 1000)
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--due-before {text!r} is not 'now', epoch milliseconds or ISO-8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _selection(
    ids: list[str] | None,
    topic: str | None,
    error_class: str | None,
    dlq_topic: str | None,
    state: str | None,
    due_before: str | None,
    limit: int | None,
    everything: bool = False,
) -> Selection:
    from kafka_dlq.pending import Selection

    try:
        return Selection(
            ids=tuple(ids or ()),
            original_topic=topic,
            error_class=error_class,
            dlq_topic=dlq_topic,
            state=state,
            due_before=_time(due_before),
            limit=limit,
            everything=everything,
        )
    except ConfigError as exc:
        raise _fail(exc) from exc


def _need(name: str | None, redis_url: str | None) -> tuple[str, str]:
    if not name:
        raise _fail(ConfigError("which handler? pass --name, set KAFKA_DLQ_NAME or give --config FILE"))
    if not redis_url:
        raise _fail(ConfigError("no Redis given: pass --redis-url, set KAFKA_DLQ_REDIS_URL or give --config FILE"))
    return name, redis_url


@pending_app.callback()
def pending_command(
    ctx: typer.Context,
    name: NameOption = None,
    redis_url: RedisOption = None,
    ids: IdOption = None,
    topic: TopicOption = None,
    error_class: ErrorOption = None,
    dlq_topic: DlqTopicOption = None,
    state: StateOption = None,
    due_before: DueBeforeOption = None,
    limit: LimitOption = None,
    show: Annotated[int, typer.Option(help="Entries to list (counts cover all that match).")] = 20,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The handler's pending retries in Redis: counts and a listing; retry-now, park or drop selected ones.

    Without a subcommand: counts by state, original topic, error class and due time, and the first entries.

    Example: kafka-dlq pending --name billing --topic payments --error-class '*Timeout*' --json
    """
    if ctx.invoked_subcommand is not None:
        given = [ids, topic, error_class, dlq_topic, state, due_before, limit]
        if (
            any(value for value in given)
            or as_json
            or getattr(ctx.get_parameter_source("show"), "name", "DEFAULT") != "DEFAULT"
        ):
            raise _fail(
                ConfigError(
                    f"put the options after `pending {ctx.invoked_subcommand}`: those before it are the listing's"
                )
            )
        ctx.obj = {"name": name, "redis_url": redis_url, "config": config_file}
        return
    from kafka_dlq.pending import PendingRetries

    handler, url, _ = _settings(ctx, name, redis_url, config_file)
    selection = _selection(ids, topic, error_class, dlq_topic, state, due_before, limit)

    async def work() -> PendingSummary:
        async with PendingRetries(url, handler) as pending:
            with _progress("reading the schedule") as update:
                return await pending.summary(selection, show=show, progress=update)

    summary = _run(work())
    if as_json:
        _emit(summary.to_json(), True, "")
        return
    totals = summary.totals
    console.print(
        f"[bold]handler {escape(handler)}[/]: {totals['total']} pending ({totals['due']} due, "
        f"{totals['inflight']} in flight); {summary.matched} match; next due {_when(summary.next_due)}; "
        f"{summary.expired_leases} expired lease(s)",
        highlight=False,
    )
    console.print(_counts("by original topic", summary.by_original_topic, 15))
    console.print(_counts("by error class", summary.by_error_class, 15))
    console.print(_counts("by due time", summary.by_due, 15))
    listing = Table(title=f"first {len(summary.entries)}", title_justify="left", show_edge=False)
    for column in ("id", "state", "due / lease until (UTC)", "original topic", "error class", "attempts", "message"):
        listing.add_column(column, no_wrap=column.startswith("due"), overflow="fold")
    for entry in summary.entries:
        listing.add_row(
            escape(entry.id),
            entry.state,
            _when(entry.at, zone=False),
            escape(entry.original_topic),
            escape(entry.error_class or "-"),
            str(entry.attempts),
            escape((entry.message or "")[:60]),
        )
    console.print(listing)


def _settings(
    ctx: typer.Context, name: str | None, redis_url: str | None, config_file: str | None
) -> tuple[str, str, Connection]:
    """The handler's name and Redis: this command's flags, then those given before it (``pending --name x park``),
    then the config file's; and what the file gives besides."""
    parent = ctx.obj or {}
    try:
        found = file_settings(config_file or parent.get("config"))
    except ConfigError as exc:
        raise _fail(exc) from exc
    handler, url = _need(
        name or parent.get("name") or found.name, redis_url or parent.get("redis_url") or found.redis_url
    )
    return handler, url, found


def _report_action(result: ActionResult, as_json: bool) -> None:
    if as_json:
        _emit(result.to_json(), True, "")
    else:
        console.print(f"{result.action}: {len(result.done)} done by {escape(result.by)}", highlight=False)
        for entry_id in result.in_flight:
            console.print(
                f"  refused {escape(entry_id)}: in flight (a handler is running it); try again when it is due",
                highlight=False,
            )
        for entry_id in result.missing:
            console.print(f"  not found {escape(entry_id)}: not pending (any more)", highlight=False)
        for entry_id, why in result.failed.items():
            console.print(f"  failed {escape(entry_id)}: {escape(why)}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


@pending_app.command("retry-now")
def retry_now_command(
    ctx: typer.Context,
    ids: IdOption = None,
    topic: TopicOption = None,
    error_class: ErrorOption = None,
    dlq_topic: DlqTopicOption = None,
    due_before: DueBeforeOption = None,
    limit: LimitOption = None,
    everything: AllOption = False,
    name: NameOption = None,
    redis_url: RedisOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Make the selected entries due now. Entries a handler is running (in flight) are refused; exit code 1 then.

    Example: kafka-dlq pending retry-now --name billing --topic payments --error-class builtins.ConnectionError
    """
    from kafka_dlq.pending import PendingRetries

    handler, url, _ = _settings(ctx, name, redis_url, config_file)
    selection = _selection(ids, topic, error_class, dlq_topic, None, due_before, limit, everything)

    async def work() -> ActionResult:
        async with PendingRetries(url, handler) as pending:
            with _progress("reading the schedule") as update:
                return await pending.retry_now(selection, progress=update)

    _report_action(_run(work()), as_json)


@pending_app.command("park")
def park_command(
    ctx: typer.Context,
    ids: IdOption = None,
    topic: TopicOption = None,
    error_class: ErrorOption = None,
    dlq_topic: DlqTopicOption = None,
    due_before: DueBeforeOption = None,
    limit: LimitOption = None,
    everything: AllOption = False,
    note: NoteOption = None,
    by: ByOption = None,
    poison_topic: Annotated[
        str | None,
        typer.Option(envvar="KAFKA_DLQ_POISON_TOPIC", help="Poison topic (default: <dlq topic>.poison)."),
    ] = None,
    name: NameOption = None,
    redis_url: RedisOption = None,
    bootstrap: BootstrapOption = None,
    kafka_setting: KafkaSettingOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Park the selected entries: write each to the poison topic (reason manual), then remove it from the schedule.

    Entries a handler is running (in flight) are refused; an entry whose write fails stays due. Exit code 1 then.

    Example: kafka-dlq pending park --name billing --id payments.dlq/0/17 --note "customer closed" --by alice
    """
    from kafka_dlq.pending import PendingRetries

    handler, url, found = _settings(ctx, name, redis_url, config_file)
    config = _config_or_fail(bootstrap, kafka_setting, found)
    selection = _selection(ids, topic, error_class, dlq_topic, None, due_before, limit, everything)

    async def work() -> ActionResult:
        pending = PendingRetries(url, handler, kafka_config=config, poison_topic=poison_topic, by=by)
        async with pending:
            with _progress("reading the schedule") as update:
                return await pending.park(selection, note=note, progress=update)

    _report_action(_run(work()), as_json)


@pending_app.command("drop")
def drop_command(
    ctx: typer.Context,
    ids: IdOption = None,
    topic: TopicOption = None,
    error_class: ErrorOption = None,
    dlq_topic: DlqTopicOption = None,
    due_before: DueBeforeOption = None,
    limit: LimitOption = None,
    everything: AllOption = False,
    note: NoteOption = None,
    by: ByOption = None,
    name: NameOption = None,
    redis_url: RedisOption = None,
    config_file: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Drop the selected entries for good, recording each in the handler's history (who, when, note).

    Entries a handler is running (in flight) are refused; exit code 1 then.

    Example: kafka-dlq pending drop --name billing --topic test-orders --all --note "test data" --json
    """
    from kafka_dlq.pending import PendingRetries

    handler, url, _ = _settings(ctx, name, redis_url, config_file)
    selection = _selection(ids, topic, error_class, dlq_topic, None, due_before, limit, everything)

    async def work() -> ActionResult:
        async with PendingRetries(url, handler, by=by) as pending:
            with _progress("reading the schedule") as update:
                return await pending.drop(selection, note=note, progress=update)

    _report_action(_run(work()), as_json)


# ---------------------------------------------------------------- doctor

_MARK = {"ok": "[green]ok[/]   ", "warn": "[yellow]warn[/] ", "error": "[red]error[/]"}


@app.command("doctor")
def doctor_command(
    topics: Annotated[
        list[str] | None,
        typer.Option("--topic", envvar="KAFKA_DLQ_TOPICS", help="Dead-letter topic(s) the handler consumes."),
    ] = None,
    poison_topic: Annotated[
        str | None,
        typer.Option(envvar="KAFKA_DLQ_POISON_TOPIC", help="Poison topic (default: <dlq topic>.poison)."),
    ] = None,
    groups: Annotated[
        list[str] | None,
        typer.Option(
            "--group", envvar="KAFKA_DLQ_GROUP_ID", help="Consumer group(s) to check (default: the handler's)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", envvar="KAFKA_DLQ_CONFIG", help="The handler's TOML file: checked, and used."),
    ] = None,
    name: NameOption = None,
    bootstrap: BootstrapOption = None,
    redis_url: RedisOption = None,
    kafka_setting: KafkaSettingOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each server.")] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Check the brokers, topics, consumer groups, Redis and its persistence; say what is wrong and how to fix it.

    Exit code 1 when a check fails (warnings do not fail).

    Example: kafka-dlq doctor --name billing --topic payments.dlq --json
    """
    from kafka_dlq.doctor import DoctorReport, Status, run_doctor

    report = DoctorReport()
    topic_list, group_list = _split(topics), _split(groups)
    kafka: dict[str, Any] = {}
    if config is not None:
        from kafka_dlq.config import load_config

        try:
            loaded = load_config(config).handler
        except KafkaDLQError as exc:
            report.add("config", Status.ERROR, str(exc), "fix the file (kafka-dlq run reads it the same way)")
        else:
            report.add("config", Status.OK, f"{config} loads (processors import)")
            name = name or loaded.get("name")
            bootstrap = bootstrap or loaded.get("bootstrap_servers")
            redis_url = redis_url or loaded.get("redis_url")
            topic_list = topic_list or list(loaded.get("topics", []))
            poison_topic = poison_topic or loaded.get("poison_topic")
            group_list = group_list or ([loaded["group_id"]] if loaded.get("group_id") else [])
            kafka.update(loaded.get("kafka_config", {}))
    try:
        kafka_config = {**kafka, **_kafka_config(bootstrap, kafka_setting)} if bootstrap else None
    except ConfigError as exc:
        raise _fail(exc) from exc

    async def work() -> DoctorReport:
        return await run_doctor(
            kafka_config=kafka_config,
            redis_url=redis_url,
            name=name,
            topics=topic_list,
            poison_topic=poison_topic,
            groups=group_list,
            timeout=timeout,
        )

    err = Console(stderr=True)
    with err.status("doctor: checking") if err.is_terminal and not as_json else contextlib.nullcontext():
        found = _run(work())
    report.checks += found.checks
    if as_json:
        _emit(report.to_json(), True, "")
    else:
        for check in report.checks:
            console.print(f"{_MARK[check.status]} {escape(check.name)}: {escape(check.detail)}", highlight=False)
            if check.fix and check.status is not Status.OK:
                console.print(f"        fix: {escape(check.fix)}", highlight=False, soft_wrap=True)
        counts = report.to_json()["counts"]
        verdict = "[green]all good[/]" if report.ok else "[red]something is wrong[/]"
        console.print(f"{verdict}: {counts['ok']} ok, {counts['warn']} warning(s), {counts['error']} error(s)")
    if not report.ok:
        raise typer.Exit(1)
