"""Retry policy: how long to wait before the next try, and when to stop trying.

Pure: no clock and no I/O. Times come in as numbers (epoch milliseconds), randomness is injected, so every
branch can be tested exhaustively.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar

from kafka_dlq.errors import ConfigError

__all__ = ["Backoff", "Duration", "Jitter", "RetryPolicy", "Rng", "TopicPolicies", "resolve_delay"]

Duration = float | timedelta
"""Seconds (``int`` or ``float``) or a :class:`~datetime.timedelta`; normalised once to float seconds."""

Rng = random.Random | Callable[[], float]
"""A source of uniform numbers in [0, 1): a :class:`random.Random` or a zero-argument callable."""

_E = TypeVar("_E", bound=StrEnum)

# Every strategy is at its cap long before this; clamping first keeps int-to-float conversions finite.
_ATTEMPT_CEILING = 2**53


class Backoff(StrEnum):
    """How the delay grows with the number of failed attempts ``n`` (before the cap)."""

    EXPONENTIAL = "exponential"
    """``initial * multiplier ** (n - 1)``"""
    LINEAR = "linear"
    """``initial * n``"""
    FIXED = "fixed"
    """``initial``"""
    IMMEDIATE = "immediate"
    """``0``: retry as soon as possible (jitter does not apply)."""


class Jitter(StrEnum):
    """Randomness spread over the delay ``d`` so that records failing together do not retry together.

    Definitions from the AWS Architecture Blog, "Exponential Backoff And Jitter" (2015).
    """

    NONE = "none"
    """``d``"""
    FULL = "full"
    """``uniform(0, d)``"""
    EQUAL = "equal"
    """``d / 2 + uniform(0, d / 2)``"""
    DECORRELATED = "decorrelated"
    """``min(max_delay, uniform(initial, previous * 3))``"""


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """When to retry a failed record, and when to give up. Keyword-only, immutable, validated on creation.

    Defaults, chosen for a DLQ handler whose retries do not stall a partition:

    - ``backoff=EXPONENTIAL``, ``initial_delay=1`` s, ``multiplier=2``: Karafka's defaults (1 s pause, doubling).
    - ``max_delay=300`` s: Karafka caps in-place pauses at 30 s because they stall the partition; a scheduled
      retry does not, so it can wait longer for a downstream to come back.
    - ``jitter=FULL``: AWS's recommendation; without jitter, records that failed together retry together.
    - ``max_attempts=10``: Spring Kafka's ``DefaultErrorHandler`` gives up after 10 failures.
    - ``max_age=None``: no age limit unless asked for.

    ``max_attempts`` counts *failed attempts*, the original delivery included (the ``dlq.attempts`` header): a
    record is parked when its ``max_attempts``-th attempt fails. So "max 2 retries" is ``max_attempts=3``:

    >>> seed = RetryPolicy(initial_delay=1, multiplier=2, max_attempts=3, jitter=Jitter.NONE)
    >>> [seed.next_delay(n) for n in (1, 2)]  # after the first failure, after the second
    [1.0, 2.0]
    >>> seed.exhausted(1), seed.exhausted(2), seed.exhausted(3)  # failures 1 and 2 retry; the 3rd parks
    (False, False, True)

    Durations accept seconds or a ``timedelta``; enums accept their string values (for config files):

    >>> RetryPolicy(backoff="fixed", initial_delay=timedelta(seconds=30), max_age=timedelta(hours=1)).max_age
    3600.0
    """

    backoff: Backoff
    initial_delay: float
    """Seconds."""
    max_delay: float
    """Seconds; no delay (jittered or not) exceeds it."""
    multiplier: float
    jitter: Jitter
    max_attempts: int | None
    """Failed attempts (the original delivery included) after which the record is parked; None: no limit."""
    max_age: float | None
    """Seconds since the first failure after which the record is parked; None: no limit."""

    # A hand-written __init__ rather than __post_init__, so that the fields are typed as what they hold (float
    # seconds) while the constructor accepts what users have (seconds, timedelta, enum names).
    def __init__(
        self,
        *,
        backoff: Backoff | str = Backoff.EXPONENTIAL,
        initial_delay: Duration = 1.0,
        max_delay: Duration = 300.0,
        multiplier: float = 2.0,
        jitter: Jitter | str = Jitter.FULL,
        max_attempts: int | None = 10,
        max_age: Duration | None = None,
    ) -> None:
        strategy = _choice("backoff", Backoff, backoff)
        initial = _seconds("initial_delay", initial_delay)
        cap = _seconds("max_delay", max_delay)
        if cap < initial:
            raise ConfigError(
                f"RetryPolicy.max_delay ({cap} s) is below initial_delay ({initial} s): raise max_delay or lower "
                "initial_delay"
            )
        if initial == 0 and strategy in (Backoff.EXPONENTIAL, Backoff.LINEAR):
            raise ConfigError(
                f"RetryPolicy.initial_delay must be > 0 for {strategy} backoff (from 0 it never grows): set it, "
                "or use backoff=Backoff.IMMEDIATE to retry without delay"
            )
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not multiplier >= 1:
            raise ConfigError(
                f"RetryPolicy.multiplier must be a number >= 1, got {multiplier!r}: below 1 delays would shrink; "
                "use backoff=Backoff.FIXED for a constant delay"
            )
        if not math.isfinite(multiplier):
            raise ConfigError(f"RetryPolicy.multiplier must be finite, got {multiplier!r}")
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ConfigError(
                f"RetryPolicy.max_attempts must be an int >= 1 or None, got {max_attempts!r}: it counts failed "
                "attempts including the first delivery, so 1 parks on the first failure and 3 allows 2 retries"
            )
        age = None if max_age is None else _seconds("max_age", max_age)
        if age == 0:
            raise ConfigError("RetryPolicy.max_age must be > 0 seconds, or None for no age limit")
        set_ = object.__setattr__
        set_(self, "backoff", strategy)
        set_(self, "initial_delay", initial)
        set_(self, "max_delay", cap)
        set_(self, "multiplier", float(multiplier))
        set_(self, "jitter", _choice("jitter", Jitter, jitter))
        set_(self, "max_attempts", max_attempts)
        set_(self, "max_age", age)

    def next_delay(self, attempt: int, *, rng: Rng | None = None, previous_delay: float | None = None) -> float:
        """Seconds to wait before the next try, after ``attempt`` failed attempts (1 = after the first failure).

        The result is always within ``[0, max_delay]``, for any ``attempt``: 10**9 returns the cap at once.
        An ``attempt`` below 1 counts as 1: a dead letter from a format that does not count attempts arrives
        with 0, yet it has failed at least once.

        ``rng`` draws the jitter (default: the ``random`` module). ``previous_delay`` feeds decorrelated jitter;
        without it the un-jittered delay of the previous attempt stands in, so a schedule need not store it.

        >>> RetryPolicy(jitter=Jitter.NONE).next_delay(4)
        8.0
        >>> RetryPolicy(jitter=Jitter.FULL).next_delay(4, rng=lambda: 0.5)
        4.0
        >>> RetryPolicy(jitter=Jitter.NONE).next_delay(10**9)
        300.0
        """
        attempt = min(max(attempt, 1), _ATTEMPT_CEILING)
        delay = self._base_delay(attempt)
        if self.jitter is Jitter.NONE or delay == 0:
            return delay
        u = _draw(rng)
        if self.jitter is Jitter.FULL:
            delay *= u
        elif self.jitter is Jitter.EQUAL:
            delay = delay / 2 + delay / 2 * u
        else:
            previous = previous_delay
            if previous is None or not math.isfinite(previous) or previous < 0:
                previous = self._base_delay(attempt - 1) if attempt > 1 else self.initial_delay
            low = self.initial_delay
            # Clamp before drawing: previous * 3 may be inf, and inf * 0 would be NaN.
            high = min(max(low, previous * 3), self.max_delay)
            delay = low + (high - low) * u
        # Float rounding in the sums above must not step outside the promised bounds.
        return min(max(delay, 0.0), self.max_delay)

    def exhausted(self, attempts: int) -> bool:
        """True once ``attempts`` failed attempts have used up ``max_attempts``: park, do not retry.

        >>> RetryPolicy(max_attempts=3).exhausted(3)
        True
        """
        return self.max_attempts is not None and attempts >= self.max_attempts

    def too_old(self, first_failure_ms: int, now_ms: int) -> bool:
        """True once ``max_age`` has passed since the first failure (exactly at the limit counts as too old).

        >>> RetryPolicy(max_age=60).too_old(first_failure_ms=0, now_ms=60_000)
        True
        """
        return self.max_age is not None and now_ms - first_failure_ms >= self.max_age * 1000

    def _base_delay(self, attempt: int) -> float:
        """The un-jittered delay after ``attempt`` (>= 1) failures, capped at ``max_delay``."""
        if self.backoff is Backoff.IMMEDIATE:
            return 0.0
        if self.backoff is Backoff.FIXED:
            raw = self.initial_delay
        elif self.backoff is Backoff.LINEAR:
            raw = self.initial_delay * attempt
        else:
            # Compare in log space: multiplier ** steps raises OverflowError long before steps reaches 10**9.
            growth = (attempt - 1) * math.log(self.multiplier)
            if growth >= math.log(self.max_delay) - math.log(self.initial_delay):
                return self.max_delay
            # The plain power is exact for the usual cases; past e**700 it would overflow, so add logarithms.
            if growth < 700:
                raw = self.initial_delay * self.multiplier ** (attempt - 1)
            else:
                raw = math.exp(math.log(self.initial_delay) + growth)
        return min(raw, self.max_delay)


def _choice(name: str, enum: type[_E], value: _E | str) -> _E:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ConfigError(f"RetryPolicy.{name} must be one of {choices}, got {value!r}") from None


def _seconds(name: str, value: object) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(f"RetryPolicy.{name} must be seconds (a number) or a timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"RetryPolicy.{name} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _draw(rng: Rng | None) -> float:
    if rng is None:
        u = random.random()
    elif isinstance(rng, random.Random):
        u = rng.random()
    else:
        u = rng()
    # A callable outside [0, 1] (or NaN) must not push a delay out of its bounds.
    return u if 0.0 <= u <= 1.0 else (1.0 if u > 1.0 else 0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicPolicies:
    """A default policy plus overrides per original topic.

    >>> policies = TopicPolicies(topics={"payments": RetryPolicy(max_attempts=20)})
    >>> policies.for_topic("payments").max_attempts, policies.for_topic("orders").max_attempts
    (20, 10)
    """

    default: RetryPolicy = field(default_factory=RetryPolicy)
    topics: Mapping[str, RetryPolicy] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.default, RetryPolicy):
            raise ConfigError(f"TopicPolicies.default must be a RetryPolicy, got {self.default!r}")
        for topic, policy in self.topics.items():
            if not isinstance(policy, RetryPolicy):
                raise ConfigError(f"TopicPolicies.topics[{topic!r}] must be a RetryPolicy, got {policy!r}")
        # A read-only copy: the caller's dict changing later must not change a running handler's policy.
        object.__setattr__(self, "topics", MappingProxyType(dict(self.topics)))

    def for_topic(self, topic: str | None) -> RetryPolicy:
        """The policy for records that came from ``topic`` (None or an unlisted topic: the default)."""
        if topic is None:
            return self.default
        return self.topics.get(topic, self.default)


def resolve_delay(
    policies: TopicPolicies,
    topic: str | None,
    attempt: int,
    *,
    override: float | timedelta | str | bytes | None = None,
    rng: Rng | None = None,
    previous_delay: float | None = None,
) -> float:
    """The delay before the next retry, resolved in the fixed order: record override, topic policy, default.

    ``override`` is a per-record delay in seconds, e.g. a header's value (``b"30"``) or a processor's
    ``RetryLater(delay=...)``. It is explicit, so it is not capped by ``max_delay``; a negative one means "now"
    (0). One that is not a finite number (unparseable text, NaN, infinity) is ignored and the policy decides:
    a bad header must not crash the handler nor hold a record forever.

    >>> policies = TopicPolicies(default=RetryPolicy(jitter=Jitter.NONE))
    >>> resolve_delay(policies, "orders", 3), resolve_delay(policies, "orders", 3, override=b"30")
    (4.0, 30.0)
    """
    seconds = _parse_override(override)
    if seconds is not None:
        return seconds
    return policies.for_topic(topic).next_delay(attempt, rng=rng, previous_delay=previous_delay)


def _parse_override(value: float | timedelta | str | bytes | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        try:
            text = value.decode() if isinstance(value, bytes) else value
            seconds = float(text)
        except (UnicodeDecodeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)
