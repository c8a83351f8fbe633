"""Classifier: for a failure, decide whether to retry the record later or park it, and why.

Pure: it takes the error (an exception raised here, or the class name and message read from a dead letter),
counts and epoch milliseconds, and returns a :class:`Decision`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from kafka_dlq.errors import ConfigError
from kafka_dlq.outcomes import Outcome, ParkNow, Reason, RetryLater
from kafka_dlq.policy import RetryPolicy
from kafka_dlq.records import Failure

__all__ = ["Classifier", "Decision", "FailureContext", "Rule", "qualified_name", "undecodable"]


def qualified_name(exc_or_type: BaseException | type[object]) -> str:
    """The fully qualified class name, as the ``dlq.error.class`` header carries it.

    >>> qualified_name(ValueError("bad")), qualified_name(KeyError)
    ('builtins.ValueError', 'builtins.KeyError')
    """
    cls = exc_or_type if isinstance(exc_or_type, type) else type(exc_or_type)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Retry the record later, or park it with a reason. Build one with :meth:`retry` or :meth:`park`.

    ``delay`` is set on a retry only when something asked for a specific delay (``RetryLater(delay=...)``);
    None means "the policy's delay" (see :func:`kafka_dlq.policy.resolve_delay`). ``detail`` is for humans.

    >>> Decision.park(Reason.NON_RETRYABLE, "customer deleted").outcome
    <Outcome.PARKED: 'parked'>
    """

    outcome: Outcome
    reason: Reason | None = None
    delay: float | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.outcome is Outcome.RETRY:
            if self.reason is not None:
                raise ConfigError("Decision: a retry has no reason; use Decision.park(reason, detail) to park")
            if self.delay is not None and not (math.isfinite(self.delay) and self.delay >= 0):
                raise ConfigError(f"Decision.delay must be finite seconds >= 0 or None, got {self.delay!r}")
        elif self.outcome is Outcome.PARKED:
            if not isinstance(self.reason, Reason) or self.delay is not None:
                raise ConfigError("Decision: parking needs a Reason and no delay; use Decision.park(reason, detail)")
        else:
            raise ConfigError(f"Decision.outcome must be Outcome.RETRY or Outcome.PARKED, got {self.outcome!r}")

    @classmethod
    def retry(cls, detail: str = "", *, delay: float | None = None) -> Decision:
        """Retry later: after ``delay`` seconds, or the policy's delay when None."""
        return cls(outcome=Outcome.RETRY, delay=delay, detail=detail)

    @classmethod
    def park(cls, reason: Reason, detail: str = "") -> Decision:
        """Park now, for ``reason``."""
        return cls(outcome=Outcome.PARKED, reason=reason, detail=detail)

    @property
    def parked(self) -> bool:
        return self.outcome is Outcome.PARKED


def undecodable(detail: str) -> Decision:
    """The decision for a record that could not be decoded: park it, reason ``undecodable``.

    The handler takes it before classifying (there is no error to classify, only bytes it could not read).

    >>> undecodable("value is not JSON").reason
    <Reason.UNDECODABLE: 'undecodable'>
    """
    return Decision.park(Reason.UNDECODABLE, detail)


@dataclass(frozen=True, slots=True, kw_only=True)
class FailureContext:
    """What a user :data:`Rule` sees: the same facts whether the error was raised here or read from a dead letter."""

    exception: BaseException | None
    """The exception, when it was raised in this process; None when read from a dead letter."""
    error_class: str | None
    """Fully qualified class name, e.g. ``builtins.ValueError`` or ``java.lang.NullPointerException``."""
    message: str
    attempts: int
    age_ms: int | None
    """Milliseconds since the first failure; None when unknown."""


Rule = Callable[[FailureContext], Decision | None]
"""A user rule: return a :class:`Decision` to decide, or None to let the built-in rules go on."""


@dataclass(frozen=True, kw_only=True)
class Classifier:
    """Decides, for a failure, retry or park. Rules run in this fixed order; the first that decides wins:

    1. The processor's own word: :class:`~kafka_dlq.outcomes.ParkNow` parks with its reason (free text becomes
       ``manual``, the text kept in ``detail``), whatever the limits; :class:`~kafka_dlq.outcomes.RetryLater`
       retries with its delay, skipping rules 2 to 6 but not the limits 7 and 8 (a processor that always says
       "later" would otherwise retry forever).
    2. No processor for the original topic: park, ``no_processor``.
    3. Repeat offender (the same content failed ``repeat_offender_threshold`` times after redrives): park,
       ``repeat_offender``.
    4. The error's class. The most specific class wins, as in Spring's ``BinaryExceptionClassifier``: walk the
       exception's MRO from its own class up; the first class listed in ``non_retryable`` (park,
       ``non_retryable``), listed in ``retryable``, or defining a boolean ``retryable`` attribute, decides. At one
       class the lists beat the attribute (the operator's word beats the library author's). So
       ``non_retryable=[OSError], retryable=[TimeoutError]`` parks a ``FileNotFoundError`` and retries a
       ``TimeoutError``. A class name read from a dead letter has no MRO: it matches by exact fully qualified
       name. A class listed in both lists is a :class:`~kafka_dlq.errors.ConfigError`.
    5. ``non_retryable_patterns`` on the message: park, ``non_retryable``. Patterns match whole words, never
       substrings: ``"500"`` matches "HTTP 500 error" but not "timeout after 5000ms". Plain strings are literal
       and case-insensitive; compiled regexes keep their flags and get the same word guards.
    6. ``rule``, a user callable: a Decision is final, None goes on.
    7. ``max_age`` of the policy reached: park, ``max_age`` (skipped when the first failure time is unknown).
    8. ``max_attempts`` of the policy reached: park, ``max_attempts``.
    9. Otherwise retry, with the policy's delay. Unknown errors are retried, like Spring's ``DefaultErrorHandler``.

    A class judged retryable at step 4 skips steps 5 and 6 (it is classified), but never the limits 7 and 8.
    Undecodable records never get here: see :func:`undecodable`.

    >>> classifier = Classifier(non_retryable=[KeyError], non_retryable_patterns=["400"])
    >>> policy = RetryPolicy(max_attempts=3)
    >>> classifier.classify(KeyError("id"), policy=policy, attempts=1, first_failure_ms=0, now_ms=0).reason
    <Reason.NON_RETRYABLE: 'non_retryable'>
    >>> failure = Failure(error_class="java.io.IOException", message="HTTP 503 from billing")
    >>> classifier.classify(failure, policy=policy, attempts=1, first_failure_ms=0, now_ms=0).outcome
    <Outcome.RETRY: 'retry'>
    """

    non_retryable: Collection[type[BaseException] | str] = ()
    """Exception classes, or fully qualified names (``"java.lang.NullPointerException"``), never worth a retry."""
    retryable: Collection[type[BaseException] | str] = ()
    """Exception classes or names to retry even where a broader class is non-retryable."""
    non_retryable_patterns: Collection[str | re.Pattern[str]] = ()
    """Words or phrases (or compiled regexes) that, found in the message, mark the error non-retryable."""
    rule: Rule | None = None
    repeat_offender_threshold: int | None = 3
    """Park once the same content has failed this many times after being redriven; None: never."""

    _non_retryable: frozenset[str] = field(init=False, repr=False, compare=False)
    _retryable: frozenset[str] = field(init=False, repr=False, compare=False)
    _patterns: tuple[tuple[re.Pattern[str], str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        non_retryable = _names("non_retryable", self.non_retryable)
        retryable = _names("retryable", self.retryable)
        if both := non_retryable & retryable:
            raise ConfigError(
                f"Classifier: {', '.join(sorted(both))} is listed both retryable and non_retryable: keep one"
            )
        threshold = self.repeat_offender_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1):
            raise ConfigError(f"Classifier.repeat_offender_threshold must be an int >= 1 or None, got {threshold!r}")
        set_ = object.__setattr__
        # Tuples, so that the classifier stays hashable and a caller's list changing later changes nothing.
        set_(self, "non_retryable", tuple(self.non_retryable))
        set_(self, "retryable", tuple(self.retryable))
        set_(self, "non_retryable_patterns", tuple(self.non_retryable_patterns))
        set_(self, "_non_retryable", non_retryable)
        set_(self, "_retryable", retryable)
        set_(self, "_patterns", tuple((_word_pattern(p), _label(p)) for p in self.non_retryable_patterns))

    def classify(
        self,
        error: BaseException | Failure,
        *,
        policy: RetryPolicy,
        attempts: int,
        first_failure_ms: int | None,
        now_ms: int,
        has_processor: bool = True,
        repeat_failures: int = 0,
    ) -> Decision:
        """Retry or park the record that failed with ``error`` (an exception, or a dead letter's ``Failure``).

        ``attempts`` counts failed attempts so far, this one included. ``repeat_failures`` is how many times this
        content (its fingerprint) failed after being redriven. Exceptions from ``rule`` propagate.
        """
        exception: BaseException | None
        error_class: str | None
        if isinstance(error, BaseException):
            exception, error_class, message = error, qualified_name(error), _message(error)
        else:
            exception, error_class, message = None, error.error_class, error.message or ""
        if isinstance(exception, ParkNow):
            return _park_now(exception, message)
        if isinstance(exception, RetryLater):
            delay = exception.delay
            if delay is not None:
                # "Later" with no usable number (NaN, infinity) lets the policy decide; a negative one means now.
                delay = max(delay, 0.0) if math.isfinite(delay) else None
            # The processor's word skips the judging of the error, never the limits: a processor that always
            # says "later" must still stop.
            limited = _limits(policy, attempts, first_failure_ms, now_ms)
            return limited or Decision.retry(f"RetryLater: {message}", delay=delay)
        if not has_processor:
            return Decision.park(Reason.NO_PROCESSOR, "no processor is registered for the original topic")
        threshold = self.repeat_offender_threshold
        if threshold is not None and repeat_failures >= threshold:
            return Decision.park(
                Reason.REPEAT_OFFENDER, f"failed {repeat_failures} times after redrive (threshold {threshold})"
            )

        verdict = self._class_verdict(error)
        if verdict is not None and not verdict[0]:
            return Decision.park(Reason.NON_RETRYABLE, verdict[1])
        if verdict is None:
            for pattern, label in self._patterns:
                if pattern.search(message):
                    return Decision.park(Reason.NON_RETRYABLE, f"message matches non-retryable pattern {label}")
            if self.rule is not None:
                context = FailureContext(
                    exception=exception,
                    error_class=error_class,
                    message=message,
                    attempts=attempts,
                    age_ms=None if first_failure_ms is None else now_ms - first_failure_ms,
                )
                decided = self.rule(context)
                if decided is not None:
                    if not isinstance(decided, Decision):
                        raise ConfigError(f"Classifier.rule must return a Decision or None, got {decided!r}")
                    return decided

        limited = _limits(policy, attempts, first_failure_ms, now_ms)
        if limited is not None:
            return limited
        why = verdict[1] if verdict is not None else f"{error_class or 'unknown error'} is not known to be permanent"
        limit = "no limit" if policy.max_attempts is None else f"of {policy.max_attempts}"
        return Decision.retry(f"{why}; attempt {attempts} {limit}")

    def _class_verdict(self, error: BaseException | Failure) -> tuple[bool, str] | None:
        """(retryable, why) from the most specific class that has a say, or None when none has."""
        if isinstance(error, Failure):
            name = error.error_class
            if name in self._non_retryable:
                return False, f"{name} is listed non-retryable"
            if name in self._retryable:
                return True, f"{name} is listed retryable"
            return None
        for klass in type(error).__mro__:
            name = qualified_name(klass)
            if name in self._non_retryable:
                return False, f"{name} is listed non-retryable"
            if name in self._retryable:
                return True, f"{name} is listed retryable"
            # vars(), not getattr(): the attribute counts at the class that defines it, so a subclass's own say
            # (listed or attribute) beats it. A property or method there is not a boolean: ignored.
            flag = vars(klass).get("retryable")
            if isinstance(flag, bool):
                return flag, f"{name}.retryable is {flag}"
        return None


def _limits(policy: RetryPolicy, attempts: int, first_failure_ms: int | None, now_ms: int) -> Decision | None:
    """Rules 7 and 8: park once ``max_age`` or ``max_attempts`` is reached; None while within both."""
    if first_failure_ms is not None and policy.too_old(first_failure_ms, now_ms):
        age = (now_ms - first_failure_ms) / 1000
        return Decision.park(Reason.MAX_AGE, f"first failed {age:g} s ago (max_age {policy.max_age} s)")
    if policy.exhausted(attempts):
        return Decision.park(Reason.MAX_ATTEMPTS, f"{attempts} failed attempts (max_attempts {policy.max_attempts})")
    return None


def _names(setting: str, entries: Collection[type[BaseException] | str]) -> frozenset[str]:
    if isinstance(entries, str | type):
        raise ConfigError(f"Classifier.{setting} must be a list of classes or names, got {entries!r}: wrap it in [...]")
    names = set()
    for entry in entries:
        if isinstance(entry, type) and issubclass(entry, BaseException):
            names.add(qualified_name(entry))
        elif isinstance(entry, str) and entry.strip():
            names.add(entry.strip())
        else:
            raise ConfigError(
                f"Classifier.{setting} entries must be exception classes or fully qualified names "
                f"(e.g. 'builtins.ValueError'), got {entry!r}"
            )
    return frozenset(names)


def _word_pattern(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """Compile ``pattern`` so that it matches whole words only."""
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise ConfigError(f"Classifier.non_retryable_patterns: {pattern!r} is a bytes regex; use a str regex")
        return re.compile(rf"(?<!\w)(?:{pattern.pattern})(?!\w)", pattern.flags)
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(
            f"Classifier.non_retryable_patterns entries must be non-empty words or compiled regexes, got {pattern!r}"
        )
    text = pattern.strip()
    # Guard only the edges that are word characters: "(500)" must still match "error(500)", and \b would not
    # (it needs a word character on one side).
    before = r"(?<!\w)" if re.match(r"\w", text[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    return re.compile(before + re.escape(text) + after, re.IGNORECASE)


def _label(pattern: str | re.Pattern[str]) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern.strip())


def _message(exception: BaseException) -> str:
    try:
        return str(exception)
    except Exception:
        # A broken __str__ in user code must not crash the handler; the class name still classifies.
        return ""


def _park_now(exception: ParkNow, message: str) -> Decision:
    try:
        return Decision.park(Reason(exception.reason), f"ParkNow: {message}")
    except ValueError:
        # Free text is not a dlq.reason value: keep it for humans, and mark the parking as deliberate.
        return Decision.park(Reason.MANUAL, f"ParkNow ({exception.reason}): {message}")
