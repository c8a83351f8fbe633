"""The circuit breaker, pure: a clock injected, no Kafka, no Redis."""

from __future__ import annotations

from kafka_dlq.breaker import BreakerSettings, CircuitBreaker, CircuitState, Permit


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _half_open(threshold: int = 1) -> tuple[CircuitBreaker, _Clock]:
    clock = _Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=threshold, open_seconds=10), clock=clock)
    for _ in range(threshold):
        breaker.failure(breaker.allow())
    assert breaker.state is CircuitState.OPEN
    clock.now = 10
    return breaker, clock


def test_a_call_let_through_while_closed_that_fails_during_the_trial_leaves_the_trial_alone():
    clock = _Clock()
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_seconds=10), clock=clock)
    early = breaker.allow()  # started while closed, and slow
    assert early is not None and early.trial is None
    breaker.failure(breaker.allow())
    breaker.failure(breaker.allow())
    clock.now = 10
    trial = breaker.allow()
    assert trial is not None and trial.trial is not None

    breaker.failure(early)  # ends now, during the trial

    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow() is None  # still the one trial
    breaker.failure(trial)
    assert breaker.state is CircuitState.OPEN


def test_a_late_abandon_of_an_earlier_trial_does_not_free_the_next_trials_place():
    breaker, _ = _half_open()
    first = breaker.allow()
    breaker.abandon(first)
    second = breaker.allow()
    assert second is not None and second != first

    breaker.abandon(first)  # the first trial's cleanup runs again, late
    breaker.abandon(Permit())  # and a call that never was a trial ends without a verdict

    assert breaker.allow() is None  # the second trial still holds the only place
    breaker.success(second)
    assert breaker.state is CircuitState.CLOSED


def test_only_the_trials_own_failure_reopens_a_half_open_circuit():
    breaker, clock = _half_open(threshold=3)
    trial = breaker.allow()
    breaker.failure(Permit(trial=999))  # a permit of no trial running
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.failure(trial)
    assert breaker.state is CircuitState.OPEN and breaker.times_opened == 2
    clock.now = 15
    assert breaker.allow() is None  # open again for open_seconds from the trial's failure
    clock.now = 20
    assert breaker.allow() is not None


def test_a_breaker_turned_off_lets_every_call_through():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=0))
    for _ in range(100):
        breaker.failure(breaker.allow())
    assert breaker.state is CircuitState.CLOSED and breaker.allow() is not None


def test_docstring_examples_run():
    import doctest

    import kafka_dlq.breaker

    assert doctest.testmod(kafka_dlq.breaker).failed == 0
