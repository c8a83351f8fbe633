"""``kafka-dlq run``: the handler as a service, stopped gracefully by SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from kafka_dlq.config import RunConfig
from kafka_dlq.handler import DLQHandler

__all__ = ["run_service", "serve_until_signal"]

log = logging.getLogger("kafka_dlq.service")


async def run_service(config: RunConfig, stop: asyncio.Event, *, stop_timeout: float = 30.0) -> dict[str, Any]:
    """Run the configured handler (and its HTTP endpoint) until ``stop`` is set; returns the final metrics."""
    handler: DLQHandler = config.build()
    await handler.start()
    http: asyncio.Task[None] | None = None
    try:
        log.warning(
            "kafka-dlq handler %s running: topics %s, group %s, Redis %s%s",
            handler.name,
            ", ".join(handler.topics),
            handler.group_id,
            handler.redis_url,
            f", ops endpoint http://{config.http_host}:{config.http_port}" if config.http_port else "",
        )
        if config.http_port:
            from kafka_dlq.web.app import create_app, serve

            if config.http_token is None and config.http_host not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "ops API on %s without a token: stats, peek and dry runs are open to whoever reaches the port "
                    "(real redrives are off); set http_token or KAFKA_DLQ_HTTP_TOKEN",
                    config.http_host,
                )
            app = create_app(handler, token=config.http_token)
            http = asyncio.create_task(serve(app, host=config.http_host, port=config.http_port, stop=stop))
        await stop.wait()
    finally:
        await handler.stop(stop_timeout)
        if http is not None:
            await http
    return handler.get_metrics()


def serve_until_signal(config: RunConfig) -> dict[str, Any]:
    """Blocking entry point for the CLI: SIGTERM/SIGINT set the stop event, the handler stops gracefully."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_service(config, stop)

    return asyncio.run(main())
