"""The contiguous done-watermark of one partition: what may be committed when records finish out of order."""

from __future__ import annotations

from collections import deque

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    """Tracks records of one partition handed to the application, in offset order.

    ``watermark`` is the offset to commit: one past the highest offset below which every delivered record is done.
    A released record (handed back unprocessed, e.g. at a revoke) is no longer pending but holds the watermark:
    it was not done, so it must be read again.
    """

    __slots__ = ("_done", "_order", "generation", "pending", "watermark")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self.pending: set[int] = set()
        self.watermark: int | None = None

    def delivered(self, offset: int) -> None:
        self._order.append(offset)
        self.pending.add(offset)

    def done(self, offset: int) -> bool:
        """Mark ``offset`` done; True when that moved the watermark."""
        if offset not in self.pending:
            return False  # not ours (any more), or marked twice
        self.pending.discard(offset)
        self._done.add(offset)
        moved = False
        order, done_set = self._order, self._done
        while order and order[0] in done_set:
            first = order.popleft()
            done_set.discard(first)
            self.watermark = first + 1
            moved = True
        return moved

    def release(self, offset: int) -> None:
        """Hand ``offset`` back unprocessed: no longer pending, never committed past."""
        self.pending.discard(offset)
