"""The contiguous done-watermark of one partition: what may be committed when records finish out of order."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

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

    def delivered_many(self, offsets: list[int]) -> None:
        """``delivered`` for each of ``offsets``, in order (one call per batch instead of one per record)."""
        self._order.extend(offsets)
        self.pending.update(offsets)

    def done(self, offset: int) -> bool:
        """Mark ``offset`` done; True when that moved the watermark."""
        return self.done_many((offset,))

    def done_many(self, offsets: Iterable[int]) -> bool:
        """Mark each of ``offsets`` done; True when that moved the watermark.

        Offsets not pending (not ours any more, or marked twice) are ignored. ``pending`` shrinks last: another
        thread that sees it empty (the consumer's, at a revoke) may commit ``watermark`` at once, so by then the
        watermark must be final.
        """
        pending = self.pending
        mine = pending.intersection(offsets)  # set operations run in C: no Python step per record
        if not mine:
            return False
        done_set, order = self._done, self._order
        done_set.update(mine)
        moved = False
        if len(done_set) == len(order):
            # Every record delivered is done, none released: jump to the end at once.
            self.watermark = order[-1] + 1
            order.clear()
            done_set.clear()
            moved = True
        else:
            while order and order[0] in done_set:
                first = order.popleft()
                done_set.discard(first)
                self.watermark = first + 1
                moved = True
        pending.difference_update(mine)
        return moved

    def release(self, offset: int) -> None:
        """Hand ``offset`` back unprocessed: no longer pending, never committed past."""
        self.pending.discard(offset)
