"""The one record type the client layer hands out and takes in: plain bytes and numbers, immutable."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Headers", "KafkaRecord"]

Headers = tuple[tuple[str, bytes | None], ...]
"""Record headers in wire order; a name may repeat, a value may be null."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaRecord:
    """A record as read from (or to be written to) Kafka. Key, value and headers are kept byte for byte."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None = None
    """Epoch milliseconds, or None where the record has none."""
    key: bytes | None = None
    value: bytes | None = None
    headers: Headers = ()
    generation: int = field(default=0, compare=False, repr=False)
    """The consumer's assignment generation this record was read under (stale marks are ignored)."""

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (Kafka's convention for repeated headers), or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None
