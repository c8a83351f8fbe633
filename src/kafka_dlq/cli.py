"""The ``kafka-dlq`` command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

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
    Console(stderr=True).print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True, highlight=False)
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
    state = "running" if status["running"] else "[red]not healthy[/]"
    return "\n".join(
        [
            f"dev stack: {state}",
            f"  Kafka {kafka['version']}: {kafka['bootstrap_servers']} ({'up' if kafka['up'] else 'down'}; "
            f"log {kafka['log']})",
            f"  Redis {redis['version']}: {redis['url']} ({'up' if redis['up'] else 'down'}; log {redis['log']})",
            *(f"  export {k}={v}" for k, v in status["settings"].items()),
        ]
    )


@app.command("demo")
def demo_command(
    records: Annotated[int, typer.Option(help="How many records to send round.")] = 5,
    as_json: JsonOption = False,
) -> None:
    """Bring up the dev stack and send records round it: produce with headers, consume through a group.

    Example: kafka-dlq demo --records 10
    """
    from kafka_dlq.demo import run_demo

    try:
        result = run_demo(records=records, console=None if as_json else console)
    except KafkaDLQError as exc:
        raise _fail(exc) from exc
    if as_json:
        _emit(result, True, "")


def main() -> None:
    app()
