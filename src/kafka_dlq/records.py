"""``DeadLetter``: the one in-memory model of a failed record, whatever format it arrived in."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kafka_dlq.kafka.record import Headers
from kafka_dlq.outcomes import Reason

__all__ = ["DeadLetter", "DlqCoordinates", "Failure", "OriginalRecord"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DlqCoordinates:
    """Where a dead letter sits: its identity. Two equal payloads at two offsets are two records."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True, kw_only=True)
class OriginalRecord:
    """The record that failed, as it was on its original topic, byte for byte."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    timestamp: int | None = None
    """Epoch milliseconds."""
    key: bytes | None = None
    value: bytes | None = None
    headers: Headers = ()
    """The original headers only: no dead-letter metadata headers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """Why the record failed last."""

    error_class: str | None = None
    """Fully qualified exception class, e.g. ``builtins.ValueError`` or ``java.lang.IllegalStateException``."""
    message: str | None = None
    stacktrace: str | None = None


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A failed record with the whole story of its failure."""

    original: OriginalRecord
    failure: Failure = field(default_factory=Failure)
    attempts: int = 0
    """Failed attempts so far."""
    first_failure: int | None = None
    """Epoch milliseconds."""
    last_failure: int | None = None
    """Epoch milliseconds."""
    group: str | None = None
    """The consumer group that failed on it."""
    reason: Reason | None = None
    """Set once parked."""
    redrive_count: int = 0
    source_format: str = "native"
    """Which format it was read from: native, seed-json, spring, spring-retry, connect, streams, share-group."""
    dlq: DlqCoordinates | None = None
    """Where this dead letter was read from; None for one not read from Kafka yet."""
    extra: Mapping[str, str] = field(default_factory=_empty)
    """Format-specific facts worth keeping (Connect's connector and task, Spring's consumer group ...)."""

    def fingerprint(self) -> str:
        """A hash of original topic, key and value: the same content failing again (repeat offenders)."""
        digest = hashlib.blake2b(digest_size=16)
        for part in (self.original.topic.encode(), self.original.key, self.original.value):
            if part is None:
                digest.update(b"\x00")
            else:
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
        return digest.hexdigest()
