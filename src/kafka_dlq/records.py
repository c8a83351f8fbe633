"""``DeadLetter``: the one in-memory model of a failed record, whatever format it arrived in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

from kafka_dlq.kafka.record import Headers
from kafka_dlq.outcomes import Reason

__all__ = ["DeadLetter", "DlqCoordinates", "Failure", "OriginalRecord"]


def _setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """The slot descriptor's own setter for ``cls.name``.

    The frozen dataclasses below are built for every dead letter the handler reads (and again for every retry),
    so they write their fields in ``__init__`` through these, as ``record_from_wire`` does for ``KafkaRecord``:
    a frozen dataclass's generated ``__init__`` goes through ``object.__setattr__`` for each field, at about twice
    the cost. Each ``__init__`` takes exactly the dataclass's fields, with the same defaults (a test holds them
    to it), so ``replace()``, equality and repr are the dataclass's own.
    """
    descriptor = cls.__dict__[name]
    return cast(Callable[[Any, Any], None], descriptor.__set__)


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class DlqCoordinates:
    """Where a dead letter sits: its identity. Two equal payloads at two offsets are two records."""

    topic: str
    partition: int
    offset: int

    def __init__(self, *, topic: str, partition: int, offset: int) -> None:
        _dlq_topic(self, topic)
        _dlq_partition(self, partition)
        _dlq_offset(self, offset)

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


_dlq_topic, _dlq_partition, _dlq_offset = (_setter(DlqCoordinates, n) for n in ("topic", "partition", "offset"))


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
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

    def __init__(
        self,
        *,
        topic: str,
        partition: int | None = None,
        offset: int | None = None,
        timestamp: int | None = None,
        key: bytes | None = None,
        value: bytes | None = None,
        headers: Headers = (),
    ) -> None:
        _original_topic(self, topic)
        _original_partition(self, partition)
        _original_offset(self, offset)
        _original_timestamp(self, timestamp)
        _original_key(self, key)
        _original_value(self, value)
        _original_headers(self, headers)


_original_topic, _original_partition, _original_offset, _original_timestamp, _original_key, _original_value = (
    _setter(OriginalRecord, n) for n in ("topic", "partition", "offset", "timestamp", "key", "value")
)
_original_headers = _setter(OriginalRecord, "headers")


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Failure:
    """Why the record failed last."""

    error_class: str | None = None
    """Fully qualified exception class, e.g. ``builtins.ValueError`` or ``java.lang.IllegalStateException``."""
    message: str | None = None
    stacktrace: str | None = None

    def __init__(
        self, *, error_class: str | None = None, message: str | None = None, stacktrace: str | None = None
    ) -> None:
        _failure_class(self, error_class)
        _failure_message(self, message)
        _failure_stacktrace(self, stacktrace)


_failure_class, _failure_message, _failure_stacktrace = (
    _setter(Failure, n) for n in ("error_class", "message", "stacktrace")
)
_NO_FAILURE = Failure()


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


_EMPTY = _empty()


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
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

    def __init__(
        self,
        *,
        original: OriginalRecord,
        failure: Failure = _NO_FAILURE,
        attempts: int = 0,
        first_failure: int | None = None,
        last_failure: int | None = None,
        group: str | None = None,
        reason: Reason | None = None,
        redrive_count: int = 0,
        source_format: str = "native",
        dlq: DlqCoordinates | None = None,
        extra: Mapping[str, str] = _EMPTY,
    ) -> None:
        # The defaults of failure and extra are shared: both are immutable, as the fresh ones were.
        _dl_original(self, original)
        _dl_failure(self, failure)
        _dl_attempts(self, attempts)
        _dl_first(self, first_failure)
        _dl_last(self, last_failure)
        _dl_group(self, group)
        _dl_reason(self, reason)
        _dl_redrives(self, redrive_count)
        _dl_format(self, source_format)
        _dl_dlq(self, dlq)
        _dl_extra(self, extra)

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


_dl_original, _dl_failure, _dl_attempts, _dl_first, _dl_last, _dl_group = (
    _setter(DeadLetter, n) for n in ("original", "failure", "attempts", "first_failure", "last_failure", "group")
)
_dl_reason, _dl_redrives, _dl_format, _dl_dlq, _dl_extra = (
    _setter(DeadLetter, n) for n in ("reason", "redrive_count", "source_format", "dlq", "extra")
)
