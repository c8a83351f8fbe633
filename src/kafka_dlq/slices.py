"""Cooperative time slices: long CPU work on the event loop lets the loop serve others every couple of milliseconds.

The loop-lag aim is a p99 of 20 ms: one loop iteration runs every callback that was ready when it began, so the
handler keeps each of its own to a millisecond or two, whatever the batch size.

>>> slices = Slices()
>>> for record in batch:                                       # doctest: +SKIP
...     await slices.pause()
...     decode(record)
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["SLICE_SECONDS", "Slices"]

SLICE_SECONDS = 0.001
"""How long a piece of work runs before it lets the loop serve others."""


class Slices:
    """Measures one piece of work's slice; :meth:`pause` yields to the loop once the slice is used up."""

    __slots__ = ("_ends", "seconds")

    def __init__(self, seconds: float = SLICE_SECONDS) -> None:
        self.seconds = seconds
        self._ends = time.perf_counter() + seconds

    def used_up(self) -> bool:
        return time.perf_counter() > self._ends

    async def pause(self) -> None:
        """Yield to the loop (one iteration) when the slice is used up; the next slice starts after."""
        if time.perf_counter() > self._ends:
            await asyncio.sleep(0)
            self._ends = time.perf_counter() + self.seconds
