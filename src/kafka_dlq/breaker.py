"""A circuit breaker per original topic: when a downstream keeps failing, stop spending attempts on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = ["BreakerSettings", "CircuitBreaker", "CircuitState"]


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


class CircuitBreaker:
    """Closed: calls go through. Open: due retries are deferred until ``open_seconds`` pass, no attempt spent.
    Half open: one trial call; success closes, failure opens again.

    Only processor failures count: a record parked for its content says nothing about the downstream.
    """

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial_running = False
        self.times_opened = 0

    def allow(self) -> bool:
        """May a call go through now? In half-open state only the one trial may."""
        if self.settings.failure_threshold <= 0 or self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and self._clock() - self.opened_at >= self.settings.open_seconds:
            self.state = CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until a deferred call is worth trying again."""
        if self.state is CircuitState.OPEN:
            return max(0.05, self.settings.open_seconds - (self._clock() - self.opened_at))
        return 0.25  # half open: the trial decides soon

    def abandon(self) -> None:
        """End the half-open trial without a verdict: it ended in a way that says nothing about the downstream
        (parked for its content, cancelled by a shutdown, its claim lost). The next call may be the trial.

        Only the caller that got the trial from :meth:`allow` calls this; without it the circuit would stay half
        open with a trial that never ends, deferring every retry of the topic for good.
        """
        self._trial_running = False

    def success(self) -> None:
        self.failures = 0
        self._trial_running = False
        self.state = CircuitState.CLOSED

    def failure(self) -> None:
        self._trial_running = False
        self.failures += 1
        threshold = self.settings.failure_threshold
        if threshold > 0 and (self.state is CircuitState.HALF_OPEN or self.failures >= threshold):
            if self.state is not CircuitState.OPEN:
                self.times_opened += 1
            self.state = CircuitState.OPEN
            self.opened_at = self._clock()
