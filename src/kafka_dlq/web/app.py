"""The ops app beside ``kafka-dlq run``: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (consuming and
Redis reachable), the JSON API of :mod:`kafka_dlq.web.api` (stats, peek, redrive) and ``/openapi.json``.

An app factory with no globals: each app holds its own settings, so tests (and a process serving two clusters) make
as many as they like.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kafka_dlq import __version__
from kafka_dlq.errors import ConfigError
from kafka_dlq.handler import DLQHandler
from kafka_dlq.web.api import OpsApi
from kafka_dlq.web.openapi import openapi_document

__all__ = ["create_app", "running", "serve"]

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def create_app(
    handler: DLQHandler | None = None,
    *,
    bootstrap_servers: str | None = None,
    kafka_config: Mapping[str, Any] | None = None,
    token: str | None = None,
) -> Starlette:
    """The ops app for one handler (or, without one, just the API for a cluster).

    The API reads the cluster at ``bootstrap_servers`` with ``kafka_config``, by default the handler's. ``token``
    (at least 16 characters) guards every ``/api`` call and turns real redrives on; see :mod:`kafka_dlq.web.api`.

    >>> app = create_app(handler, token=os.environ["KAFKA_DLQ_HTTP_TOKEN"])   # doctest: +SKIP
    >>> await serve(app, port=9400, stop=stop_event)                          # doctest: +SKIP
    """
    servers = bootstrap_servers or (handler.bootstrap_servers if handler is not None else None)
    if not servers:
        raise ConfigError("the ops app needs a handler or bootstrap_servers: name the Kafka cluster it reads")
    api = OpsApi(
        bootstrap_servers=servers,
        kafka_config=kafka_config if kafka_config is not None or handler is None else handler.kafka_config,
        token=token,
        group=None if handler is None else handler.group_id,
    )
    document = openapi_document(handler=handler is not None, secured=api.secured, version=__version__)

    async def healthz(request: Request) -> Response:
        if handler is None:
            return JSONResponse({"status": "ok", "broken": [], "handler": None})
        broken = handler.broken_tasks()
        body = {"status": "ok" if not broken else "failing", "broken": broken, "handler": handler.name}
        return JSONResponse(body, status_code=200 if not broken else 503)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    routes = [Route("/healthz", healthz), Route("/openapi.json", openapi), *api.routes()]
    if handler is not None:
        ops = handler

        async def metrics(request: Request) -> Response:
            return Response(ops.metrics.prometheus(), media_type=_PROMETHEUS)

        async def readyz(request: Request) -> Response:
            ready, why = await ops.readiness()
            return JSONResponse({"ready": ready, "why": why}, status_code=200 if ready else 503)

        routes += [Route("/metrics", metrics), Route("/readyz", readyz)]
    return Starlette(routes=routes)


async def serve(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    grace: int = 5,
) -> None:
    """Serve ``app`` on the running loop until ``stop`` is set; ``started`` is set once it listens.

    Calls still running ``grace`` seconds after ``stop`` are cancelled: a real redrive may run for minutes, and the
    service must still stop. That is safe, as a redrive killed at any point is (its next run continues).
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=grace
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no "started" event
        await asyncio.sleep(0.01)
    if task.done():
        await task  # it failed to start (port taken ...): raise that
        return
    if started is not None:
        started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    server.should_exit = True
    await task


@contextlib.asynccontextmanager
async def running(app: Starlette, *, host: str = "127.0.0.1", port: int) -> AsyncIterator[None]:
    """``async with running(app, port=...)``: the app served (and listening) for the block's duration."""
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(app, host=host, port=port, stop=stop, started=started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        await task
    try:
        yield
    finally:
        stop.set()
        await task
