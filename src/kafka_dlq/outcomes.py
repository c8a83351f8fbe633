"""Decisions as values: where a record leaves, why it was parked, and what a processor may ask for."""

from __future__ import annotations

from datetime import timedelta
from enum import Enum, StrEnum

__all__ = ["Outcome", "ParkNow", "Reason", "RetryLater"]


class Outcome(Enum):
    """The door a dead letter leaves by (or, for RETRY, waits behind)."""

    RECOVERED = "recovered"
    RETRY = "retry"
    PARKED = "parked"


class Reason(StrEnum):
    """Why a record was parked; the value is what the ``dlq.reason`` header carries."""

    MAX_ATTEMPTS = "max_attempts"
    MAX_AGE = "max_age"
    NON_RETRYABLE = "non_retryable"
    UNDECODABLE = "undecodable"
    NO_PROCESSOR = "no_processor"
    REPEAT_OFFENDER = "repeat_offender"
    MANUAL = "manual"


class RetryLater(Exception):
    """Raised by a processor: try this record again later, after ``delay`` when given (else the policy's delay).

    >>> raise RetryLater(delay=30)                                  # doctest: +SKIP
    """

    def __init__(self, message: str = "retry later", *, delay: float | timedelta | None = None) -> None:
        super().__init__(message)
        self.delay = delay.total_seconds() if isinstance(delay, timedelta) else delay


class ParkNow(Exception):
    """Raised by a processor: park this record now, with ``reason`` (a :class:`Reason` or free text).

    >>> raise ParkNow("customer deleted", reason=Reason.NON_RETRYABLE)   # doctest: +SKIP
    """

    def __init__(
        self, message: str = "parked by the processor", *, reason: Reason | str = Reason.NON_RETRYABLE
    ) -> None:
        super().__init__(message)
        self.reason = reason
