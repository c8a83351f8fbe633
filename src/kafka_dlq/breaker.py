"""A circuit breaker per original topic: when a downstream keeps failing, stop spending attempts on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = ["BreakerSettings", "CircuitBreaker", "CircuitState", "Permit"]


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def gauge(self) -> int:
        """0 closed, 1 half open, 2 open: the metric's value."""
        return {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}[self]


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """``failure_threshold`` processor failures in a row open the circuit for ``open_seconds``; then one trial.

    ``failure_threshold=0`` turns the breaker off.
    """

    failure_threshold: int = 20
    open_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave for one call to go through, from :meth:`CircuitBreaker.allow`; hand it back with the call's verdict."""

    trial: int | None = None
    """The half-open trial's number when this call is the trial; None for a call let through while closed."""


class CircuitBreaker:
    """Closed: calls go through. Open: due retries are deferred until ``open_seconds`` pass, no attempt spent.
    Half open: one trial call; success closes, failure opens again.

    Only processor failures count: a record parked for its content says nothing about the downstream. Each call's
    :class:`Permit` goes back with its verdict, so that only the trial's own verdict ends the trial: a call let
    through while closed and ending late, during a trial, must not free the trial's place for a second one.

    >>> breaker = CircuitBreaker(BreakerSettings(failure_threshold=1))
    >>> permit = breaker.allow()
    >>> breaker.failure(permit)
    >>> breaker.state, breaker.allow()
    (<CircuitState.OPEN: 'open'>, None)
    """

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial: int | None = None  # the number of the trial running, if one is
        self._trials = 0
        self.times_opened = 0

    def allow(self) -> Permit | None:
        """May a call go through now? None when not; in half-open state only the one trial may."""
        if self.settings.failure_threshold <= 0 or self.state is CircuitState.CLOSED:
            return _PLAIN
        if self.state is CircuitState.OPEN and self._clock() - self.opened_at >= self.settings.open_seconds:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and self._trial is None:
            self._trials += 1
            self._trial = self._trials
            return Permit(trial=self._trial)
        return None

    def retry_in(self) -> float:
        """Seconds until a deferred call is worth trying again."""
        if self.state is CircuitState.OPEN:
            return max(0.05, self.settings.open_seconds - (self._clock() - self.opened_at))
        return 0.25  # half open: the trial decides soon

    def _holds_trial(self, permit: Permit | None) -> bool:
        return permit is not None and permit.trial is not None and permit.trial == self._trial

    def abandon(self, permit: Permit | None) -> None:
        """End the call without a verdict: it ended in a way that says nothing about the downstream (parked for its
        content, cancelled by a shutdown, its claim lost). When it was the half-open trial, the next call may be.

        Without this the circuit would stay half open with a trial that never ends, deferring every retry of the
        topic for good. Any other permit changes nothing.
        """
        if self._holds_trial(permit):
            self._trial = None

    def success(self, permit: Permit | None = None) -> None:
        """The call worked: the downstream answers, whichever call says so; the circuit closes."""
        self.failures = 0
        self._trial = None
        self.state = CircuitState.CLOSED

    def failure(self, permit: Permit | None = None) -> None:
        """The call failed against the downstream. The trial's failure opens the circuit again; a call let through
        before the trial began counts, but leaves the trial to decide."""
        self.failures += 1
        threshold = self.settings.failure_threshold
        if threshold <= 0:
            return
        if self.state is CircuitState.HALF_OPEN:
            if not self._holds_trial(permit):
                return
            self._trial = None
        elif self.failures < threshold:
            return
        if self.state is not CircuitState.OPEN:
            self.times_opened += 1
        self.state = CircuitState.OPEN
        self.opened_at = self._clock()


_PLAIN = Permit()
