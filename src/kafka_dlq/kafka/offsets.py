"""The contiguous done-watermark of one partition: what may be committed when records finish out of order."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["PartitionOffsets", "decode_done", "encode_done"]

_PREFIX = "kdlq1:"
_MAX_METADATA = 3500  # below the broker's offset.metadata.max.bytes (4096 by default)


def encode_done(base: int, done: Iterable[int]) -> str:
    """Commit metadata naming the offsets above ``base`` already done, as ranges of distances from ``base``.

    With it a restarted consumer skips what was finished out of order instead of processing it again (as
    Confluent's Parallel Consumer does). Too many ranges to fit: the highest are left out, and only read again.
    """
    parts: list[str] = []
    size = len(_PREFIX)
    start = prev = None
    for offset in sorted(o - base for o in done if o > base):
        if prev is not None and offset == prev + 1:
            prev = offset
            continue
        if start is not None:
            part = f"{start}-{prev}" if prev != start else str(start)
            size += len(part) + 1
            if size > _MAX_METADATA:
                return _PREFIX + ",".join(parts)
            parts.append(part)
        start = prev = offset
    if start is not None:
        part = f"{start}-{prev}" if prev != start else str(start)
        if size + len(part) + 1 <= _MAX_METADATA:
            parts.append(part)
    return _PREFIX + ",".join(parts) if parts else ""


def decode_done(base: int, metadata: str | None) -> set[int]:
    """The offsets ``encode_done`` named; an empty set for metadata that is not ours or is damaged."""
    if not metadata or not metadata.startswith(_PREFIX):
        return set()
    out: set[int] = set()
    try:
        for part in metadata[len(_PREFIX) :].split(","):
            if not part:
                continue
            first, _, last = part.partition("-")
            low, high = int(first), int(last or first)
            if low < 1 or high < low or high - low > 1_000_000:
                return set()
            out.update(range(base + low, base + high + 1))
    except ValueError:
        return set()
    return out


class PartitionOffsets:
    """Tracks records of one partition handed to the application, in offset order.

    ``watermark`` is the offset to commit: one past the highest offset below which every delivered record is done.
    A released record (handed back unprocessed, e.g. at a revoke) is no longer pending but holds the watermark:
    it was not done, so it must be read again.
    """

    __slots__ = ("_done", "_order", "first", "generation", "pending", "skip", "watermark")

    def __init__(self, generation: int, skip: set[int] | None = None) -> None:
        self.generation = generation
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self.pending: set[int] = set()
        self.watermark: int | None = None
        self.first: int | None = None
        """The first offset delivered under this assignment."""
        self.skip: set[int] = skip or set()
        """Offsets a previous owner finished out of order (from the committed metadata): not handed out again."""

    def commit_point(self) -> tuple[int, str] | None:
        """The offset to commit and its metadata (the done offsets above it); None when nothing is done yet."""
        base = self.watermark if self.watermark is not None else self.first
        if base is None:
            return None
        done = tuple(self._done)  # one C call: a consistent copy even while the loop marks records
        if self.watermark is None and not done:
            return None
        return base, encode_done(base, done)

    def delivered(self, offset: int) -> None:
        if self.first is None:
            self.first = offset
        self._order.append(offset)
        self.pending.add(offset)

    def delivered_many(self, offsets: list[int]) -> None:
        """``delivered`` for each of ``offsets``, in order (one call per batch instead of one per record)."""
        if self.first is None and offsets:
            self.first = offsets[0]
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
