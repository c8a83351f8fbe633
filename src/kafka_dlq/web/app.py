"""Starlette app: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (consuming and Redis reachable)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kafka_dlq.handler import DLQHandler

__all__ = ["create_app", "serve"]

_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def create_app(handler: DLQHandler) -> Starlette:
    """The ops app for one handler.

    >>> app = create_app(handler)                                   # doctest: +SKIP
    >>> await serve(app, port=9400, stop=stop_event)                # doctest: +SKIP
    """

    async def metrics(request: Request) -> Response:
        return Response(handler.metrics.prometheus(), media_type=_PROMETHEUS)

    async def healthz(request: Request) -> Response:
        broken = handler.broken_tasks()
        body = {"status": "ok" if not broken else "failing", "broken": broken, "handler": handler.name}
        return JSONResponse(body, status_code=200 if not broken else 503)

    async def readyz(request: Request) -> Response:
        ready, why = await handler.readiness()
        return JSONResponse({"ready": ready, "why": why}, status_code=200 if ready else 503)

    return Starlette(
        routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)],
    )


async def serve(
    app: Starlette, *, host: str = "127.0.0.1", port: int, stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Serve ``app`` on the running loop until ``stop`` is set; ``started`` is set once it listens."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
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
