"""How late the event loop wakes up: the measure of whether something blocks it."""

from __future__ import annotations

import asyncio
import contextlib
import math
from types import TracebackType

__all__ = ["LoopLagProbe"]


class LoopLagProbe:
    """A task that sleeps ``interval`` seconds again and again and records how much later than asked it woke.

    A call that blocks the loop for 200 ms shows up as a 200 ms sample.

    >>> async with LoopLagProbe() as probe:                         # doctest: +SKIP
    ...     await work()
    >>> probe.summary()                                             # doctest: +SKIP
    {'samples': 812, 'p50': 0.2, 'p99': 1.9, 'max': 4.1}
    """

    def __init__(self, interval: float = 0.01, max_samples: int = 200_000) -> None:
        self.interval = interval
        self.max_samples = max_samples
        self.samples_ms: list[float] = []
        self.max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            lag_ms = max(0.0, (loop.time() - before - self.interval) * 1000.0)
            self.max_ms = max(self.max_ms, lag_ms)
            if len(self.samples_ms) < self.max_samples:
                self.samples_ms.append(lag_ms)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kafka-dlq-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> LoopLagProbe:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the samples, in milliseconds (nearest rank)."""
        if not self.samples_ms:
            return 0.0
        ordered = sorted(self.samples_ms)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank]

    def summary(self) -> dict[str, float]:
        """``samples``, ``p50``, ``p99`` and ``max`` in milliseconds, rounded to 0.01."""
        return {
            "samples": float(len(self.samples_ms)),
            "p50": round(self.percentile(0.50), 2),
            "p99": round(self.percentile(0.99), 2),
            "max": round(self.max_ms, 2),
        }
