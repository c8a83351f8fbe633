"""The ``kafka-dlq`` command line."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from kafka_dlq.errors import KafkaDLQError

app = typer.Typer(
    help="Dead-letter queues for Apache Kafka: handler, tools and a local dev stack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dev_app = typer.Typer(
    help="A local Kafka and Redis for development (fixed ports, data in the cache folder).",
    no_args_is_help=True,
)
app.add_typer(dev_app, name="dev")

console = Console()
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        console.print(text)


def _fail(exc: KafkaDLQError) -> typer.Exit:
    # One clear line: what is wrong and what to do (the exception's message says both).
    # The message is text, not markup: "[broker, controller]" or "[/tmp]" in it must print as written.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


@dev_app.command("up")
def dev_up_command(
    as_json: JsonOption = False,
    kafka_port: Annotated[int, typer.Option(help="Broker port.")] = 19092,
    redis_port: Annotated[int, typer.Option(help="Redis port.")] = 16379,
) -> None:
    """Start (or find running) a local Kafka broker and Redis server and print their settings.

    Example: kafka-dlq dev up && eval "$(kafka-dlq dev status --env)"
    """
    from kafka_dlq.dev import dev_status, dev_up

    try:
        dev_up(kafka_port=kafka_port, controller_port=kafka_port + 1, redis_port=redis_port)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    status = dev_status()
    _emit(status, as_json, _status_text(status))


@dev_app.command("down")
def dev_down_command(
    as_json: JsonOption = False,
    purge: Annotated[bool, typer.Option(help="Also delete the stack's data.")] = False,
) -> None:
    """Stop the local dev stack.  Example: kafka-dlq dev down --purge"""
    from kafka_dlq.dev import dev_down

    stopped = dev_down(purge=purge)
    _emit(
        {"stopped": stopped, "purged": purge},
        as_json,
        "dev stack stopped" if stopped else "no dev stack was running",
    )


@dev_app.command("status")
def dev_status_command(
    as_json: JsonOption = False,
    env: Annotated[bool, typer.Option("--env", help="Print the settings as shell exports.")] = False,
) -> None:
    """Say whether the dev stack runs, with its connection settings.  Example: kafka-dlq dev status --json"""
    from kafka_dlq.dev import dev_status

    status = dev_status()
    if env:
        for key, value in (status.get("settings") or {}).items():
            sys.stdout.write(f"export {key}={value}\n")
        return
    _emit(status, as_json, _status_text(status))
    if not status["running"]:
        raise typer.Exit(1)


def _status_text(status: dict[str, Any]) -> str:
    if status["kafka"] is None:
        return "dev stack: not running (start it with `kafka-dlq dev up`)"
    kafka, redis = status["kafka"], status["redis"]
    if status["running"]:
        state = "running"
    elif status["stale"]:
        state = (
            "[red]stale[/]: its servers are gone (their pids may be other programs' now, left alone); "
            "`kafka-dlq dev up` starts new ones"
        )
    else:
        state = "[red]not healthy[/]"

    def health(server: dict[str, Any]) -> str:
        return "up" if server["up"] else "stale" if server["stale"] else "down"

    return "\n".join(
        [
            f"dev stack: {state}",
            f"  Kafka {escape(kafka['version'])}: {kafka['bootstrap_servers']} ({health(kafka)}; "
            f"log {escape(kafka['log'])})",
            f"  Redis {escape(redis['version'])}: {escape(redis['url'])} ({health(redis)}; log {escape(redis['log'])})",
            *(f"  export {k}={escape(str(v))}" for k, v in status["settings"].items()),
        ]
    )


@app.command("demo")
def demo_command(
    as_json: JsonOption = False,
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", help="Kafka to use instead of the dev stack (with --redis-url).")
    ] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis to use instead of the dev stack.")] = None,
) -> None:
    """The handler working through a DLQ of every kind of dead letter on the local dev stack; ends by itself.

    Example: kafka-dlq demo
    """
    from kafka_dlq.demo import run_demo

    try:
        result = run_demo(console=None if as_json else console, bootstrap=bootstrap, redis_url=redis_url)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    if as_json:
        _emit(result, True, "")


@app.command("run")
def run_command(
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", envvar="KAFKA_DLQ_CONFIG", help="TOML file; KAFKA_DLQ_* variables override it."),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            help="Serve /metrics, /healthz, /readyz and the ops API (/api/*, /openapi.json) on this port; "
            "its token comes from KAFKA_DLQ_HTTP_TOKEN (or http_token in the file)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the DLQ handler service until SIGTERM or SIGINT, then stop gracefully.

    Example: KAFKA_DLQ_BOOTSTRAP_SERVERS=127.0.0.1:19092 kafka-dlq run --config billing.toml --http-port 9400
    """
    from kafka_dlq.config import load_config
    from kafka_dlq.service import serve_until_signal

    try:
        settings = load_config(config)
        if http_port is not None:
            settings.http_port = http_port
    except KafkaDLQError as exc:
        Console(stderr=True).print(f"[bold red]config error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from exc
    try:
        metrics = serve_until_signal(settings)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    _emit(metrics, as_json, f"stopped: {metrics}")


@app.command("bench")
def bench_command(
    name: Annotated[str, typer.Argument(help="Which benchmark, e.g. client; an unknown name lists the known ones.")],
    records: Annotated[int, typer.Option(help="Records per case.")] = 100_000,
    size: Annotated[int, typer.Option(help="Value size of each record, in bytes.")] = 1024,
    partitions: Annotated[int, typer.Option(help="Partitions of each topic the benchmark creates.")] = 3,
    rounds: Annotated[
        int,
        typer.Option(help="Times the client benchmark runs each case, both sides; the median round is reported."),
    ] = 3,
    bootstrap: Annotated[
        str | None,
        typer.Option(
            "--bootstrap",
            envvar="KAFKA_DLQ_BOOTSTRAP_SERVERS",
            help="Kafka to measure against; without it, the local dev stack (started if need be).",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis-url", envvar="KAFKA_DLQ_REDIS_URL", help="Redis, for benchmarks that use it."),
    ] = None,
    client_config: Annotated[
        list[str] | None,
        typer.Option(
            "--client-config",
            "-X",
            help="KEY=VALUE librdkafka setting for every measured client, ours and the baseline alike (repeatable).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure a part of kafka-dlq on your cluster next to a plain baseline, in the same run; report the ratio.

    Benchmarks create uniquely named topics and delete them afterwards.

    Example: kafka-dlq bench client --records 200000 --json
    """
    from kafka_dlq.bench import BenchOptions, find_bench, render_table, run_bench
    from kafka_dlq.errors import ConfigError

    try:
        find_bench(name)  # before anything starts: a typo should not bring up the dev stack
        settings: dict[str, str] = {}
        for item in client_config or []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--client-config {item!r}: write KEY=VALUE, e.g. -X fetch.queue.backoff.ms=100")
            settings[key.strip()] = value
        options = BenchOptions(  # checks the figures before the dev stack comes up
            bootstrap_servers=bootstrap or "",
            redis_url=redis_url,
            records=records,
            size=size,
            partitions=partitions,
            rounds=rounds,
            client_config=settings,
        )
        if bootstrap is None:
            from kafka_dlq.dev import dev_up

            stack = dev_up()
            options = dataclasses.replace(
                options, bootstrap_servers=stack.bootstrap_servers, redis_url=redis_url or stack.redis_url
            )
        if as_json:  # stdout holds the one JSON document and nothing else
            report = run_bench(name, options)
        else:
            # Redrawn at each step only: a spinner's refresh thread would take the GIL from the loop being measured.
            with Live(
                Text(f"bench {name}: starting"), console=Console(stderr=True), auto_refresh=False, transient=True
            ) as live:
                steps = dataclasses.replace(
                    options, progress=lambda step: live.update(Text(f"bench {name}: {step}"), refresh=True)
                )
                report = run_bench(name, steps)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    if as_json:
        _emit(report.to_json(), True, "")
    else:
        console.print(render_table(report))


def main() -> None:
    app()


from kafka_dlq import cli_inspect, cli_redrive  # noqa: E402,F401  registers their commands
