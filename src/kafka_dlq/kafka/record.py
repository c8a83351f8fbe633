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


_new = object.__new__
_set_topic, _set_partition, _set_offset, _set_timestamp, _set_key, _set_value, _set_headers, _set_generation = (
    KafkaRecord.__dict__[name].__set__
    for name in ("topic", "partition", "offset", "timestamp", "key", "value", "headers", "generation")
)


def record_from_wire(
    topic: str,
    partition: int,
    offset: int,
    timestamp: int | None,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    generation: int,
) -> KafkaRecord:
    """A KafkaRecord equal to ``KafkaRecord(topic=topic, ...)``, built in about 40% of the time.

    The consumer builds one per record it reads; a frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` for every field, while the slots' own descriptors set them directly.
    """
    record = _new(KafkaRecord)
    _set_topic(record, topic)
    _set_partition(record, partition)
    _set_offset(record, offset)
    _set_timestamp(record, timestamp)
    _set_key(record, key)
    _set_value(record, value)
    _set_headers(record, headers)
    _set_generation(record, generation)
    return record
