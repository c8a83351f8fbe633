"""RetryPolicy and TopicPolicies: the retry maths, as a specification. Pure: no clock, no I/O, seeded randomness."""

from __future__ import annotations

import dataclasses
import doctest
import math
import random
import time
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kafka_dlq import policy as policy_module
from kafka_dlq.errors import ConfigError
from kafka_dlq.policy import _ATTEMPT_CEILING, Backoff, Jitter, RetryPolicy, TopicPolicies, resolve_delay

HUGE_ATTEMPTS = [10**6, 10**9, 2**63, 10**100]


def exact(backoff: Backoff = Backoff.EXPONENTIAL, **kwargs: object) -> RetryPolicy:
    """A policy without jitter, so delays are exact."""
    return RetryPolicy(backoff=backoff, jitter=Jitter.NONE, **kwargs)  # type: ignore[arg-type]


# --- defaults and the seed scenario ---------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    policy = RetryPolicy()

    assert policy.backoff is Backoff.EXPONENTIAL
    assert (policy.initial_delay, policy.multiplier, policy.max_delay) == (1.0, 2.0, 300.0)
    assert policy.jitter is Jitter.FULL
    assert policy.max_attempts == 10
    assert policy.max_age is None


def test_seed_scenario_max_two_retries_one_second_doubling_is_expressible():
    # Given the seed system's "max 2 retries, 1 s initial, multiplier 2": two retries after the first failure.
    seed = RetryPolicy(initial_delay=1, multiplier=2, max_attempts=3, jitter=Jitter.NONE)

    # Then the retries wait 1 s and 2 s, and the third failure parks.
    assert [seed.next_delay(1), seed.next_delay(2)] == [1.0, 2.0]
    assert not seed.exhausted(1)
    assert not seed.exhausted(2)
    assert seed.exhausted(3)


def test_a_record_that_fails_once_then_succeeds_is_not_exhausted_by_its_single_failure():
    seed = RetryPolicy(initial_delay=1, multiplier=2, max_attempts=3)

    assert not seed.exhausted(1)


def test_max_attempts_one_parks_on_the_first_failure():
    assert RetryPolicy(max_attempts=1).exhausted(1)


def test_no_max_attempts_is_never_exhausted():
    assert not RetryPolicy(max_attempts=None).exhausted(10**12)


# --- durations and enums in, floats out -----------------------------------------------------------------------


def test_durations_accept_seconds_or_timedelta_and_are_floats_afterwards():
    policy = RetryPolicy(
        initial_delay=timedelta(milliseconds=500), max_delay=60, max_age=timedelta(hours=1), multiplier=3
    )

    assert policy.initial_delay == 0.5
    assert policy.max_delay == 60.0
    assert policy.max_age == 3600.0
    assert policy.multiplier == 3.0
    assert all(isinstance(v, float) for v in (policy.initial_delay, policy.max_delay, policy.max_age))


def test_enums_accept_their_string_values_from_config_files():
    policy = RetryPolicy(backoff="linear", jitter="equal")

    assert policy.backoff is Backoff.LINEAR
    assert policy.jitter is Jitter.EQUAL


def test_policy_is_frozen_and_equal_by_value():
    policy = RetryPolicy()

    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 3  # type: ignore[misc]
    assert RetryPolicy(initial_delay=timedelta(seconds=2)) == RetryPolicy(initial_delay=2)
    assert hash(RetryPolicy()) == hash(RetryPolicy())


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="max_attempts"):
        dataclasses.replace(RetryPolicy(), max_attempts=0)
    assert dataclasses.replace(RetryPolicy(), max_attempts=4).max_attempts == 4


# --- configuration errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_delay": -1}, "initial_delay"),
        ({"initial_delay": float("nan")}, "initial_delay"),
        ({"initial_delay": float("inf"), "max_delay": float("inf")}, "initial_delay"),
        ({"initial_delay": "1s"}, "initial_delay"),
        ({"initial_delay": True}, "initial_delay"),
        ({"initial_delay": timedelta(seconds=-1)}, "initial_delay"),
        ({"max_delay": -5}, "max_delay"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"initial_delay": 10, "max_delay": 5}, "max_delay"),
        ({"initial_delay": 0}, "initial_delay"),
        ({"backoff": Backoff.LINEAR, "initial_delay": 0}, "initial_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": -2}, "multiplier"),
        ({"multiplier": float("nan")}, "multiplier"),
        ({"multiplier": float("inf")}, "multiplier"),
        ({"multiplier": "2"}, "multiplier"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_age": 0}, "max_age"),
        ({"max_age": -1}, "max_age"),
        ({"backoff": "exponentail"}, "backoff"),
        ({"jitter": "half"}, "jitter"),
    ],
)
def test_bad_configuration_raises_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as caught:
        RetryPolicy(**kwargs)

    assert isinstance(caught.value, ValueError)


def test_config_error_says_how_to_fix_it():
    with pytest.raises(ConfigError, match="raise max_delay or lower initial_delay"):
        RetryPolicy(initial_delay=600)
    with pytest.raises(ConfigError, match=r"Backoff\.IMMEDIATE"):
        RetryPolicy(initial_delay=0)
    with pytest.raises(ConfigError, match="exponential, linear, fixed, immediate"):
        RetryPolicy(backoff="slow")


def test_zero_delay_is_fine_for_fixed_and_immediate():
    assert exact(Backoff.FIXED, initial_delay=0).next_delay(3) == 0.0
    assert exact(Backoff.IMMEDIATE, initial_delay=0).next_delay(3) == 0.0


# --- next_delay: exact values per strategy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (Backoff.EXPONENTIAL, [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
        (Backoff.LINEAR, [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]),
        (Backoff.FIXED, [2.0] * 7),
        (Backoff.IMMEDIATE, [0.0] * 7),
    ],
)
def test_each_strategy_grows_as_documented_and_stops_at_the_cap(backoff, expected):
    policy = exact(backoff, initial_delay=2, max_delay=60)

    assert [policy.next_delay(n) for n in range(1, 8)] == expected


def test_exponential_uses_the_multiplier():
    policy = exact(initial_delay=1, multiplier=3, max_delay=1000)

    assert [policy.next_delay(n) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 27.0]


def test_linear_reaches_the_cap():
    assert exact(Backoff.LINEAR, initial_delay=10, max_delay=25).next_delay(3) == 25.0


def test_multiplier_one_is_a_constant_delay():
    assert exact(initial_delay=5, multiplier=1).next_delay(1000) == 5.0


@pytest.mark.parametrize("attempt", [0, -1, -(10**9)])
def test_attempt_below_one_counts_as_the_first_failure(attempt):
    policy = exact(initial_delay=3, max_delay=100)

    assert policy.next_delay(attempt) == policy.next_delay(1) == 3.0


@pytest.mark.parametrize("backoff", list(Backoff))
@pytest.mark.parametrize("jitter", list(Jitter))
@pytest.mark.parametrize("attempt", HUGE_ATTEMPTS)
def test_huge_attempts_return_at_most_the_cap_at_once_without_overflow(backoff, jitter, attempt):
    policy = RetryPolicy(backoff=backoff, jitter=jitter, initial_delay=0.5, max_delay=120, multiplier=1.5)

    started = time.perf_counter()
    delay = policy.next_delay(attempt, rng=random.Random(7))

    assert time.perf_counter() - started < 0.1
    assert 0.0 <= delay <= 120.0
    if jitter is Jitter.NONE:
        expected = {Backoff.IMMEDIATE: 0.0, Backoff.FIXED: 0.5}.get(backoff, 120.0)
        assert delay == expected


def test_a_tiny_multiplier_over_many_attempts_still_caps_without_overflow():
    policy = exact(initial_delay=1e-300, max_delay=1e300, multiplier=1.0000001)

    assert policy.next_delay(10**12) == 1e300


def test_growth_beyond_float_range_below_a_huge_cap_is_still_computed():
    # Given 2 ** 1155 overflows a float, but 1e-300 * 2 ** 1155 (about 5.7e47) is far below the cap.
    policy = exact(initial_delay=1e-300, max_delay=1e300, multiplier=2)

    assert policy.next_delay(1156) == pytest.approx(math.ldexp(1e-300, 1155), rel=1e-9)


# --- jitter -----------------------------------------------------------------------------------------------------


def fixed_rng(u: float):
    return lambda: u


@pytest.mark.parametrize(
    ("jitter", "u", "expected"),
    [
        (Jitter.FULL, 0.0, 0.0),
        (Jitter.FULL, 0.5, 4.0),
        (Jitter.FULL, 1.0, 8.0),
        (Jitter.EQUAL, 0.0, 4.0),
        (Jitter.EQUAL, 0.5, 6.0),
        (Jitter.EQUAL, 1.0, 8.0),
    ],
)
def test_full_and_equal_jitter_follow_the_aws_definitions(jitter, u, expected):
    # Given exponential from 1 s: after 4 failures the un-jittered delay d is 8 s.
    policy = RetryPolicy(jitter=jitter, initial_delay=1, max_delay=300)

    assert policy.next_delay(4, rng=fixed_rng(u)) == expected


@pytest.mark.parametrize(("u", "expected"), [(0.0, 2.0), (0.5, 16.0), (1.0, 30.0)])
def test_decorrelated_jitter_draws_between_initial_and_three_times_the_previous_delay(u, expected):
    policy = RetryPolicy(jitter=Jitter.DECORRELATED, initial_delay=2, max_delay=300)

    assert policy.next_delay(5, rng=fixed_rng(u), previous_delay=10) == expected


def test_decorrelated_jitter_is_capped_at_max_delay():
    policy = RetryPolicy(jitter=Jitter.DECORRELATED, initial_delay=2, max_delay=20)

    assert policy.next_delay(5, rng=fixed_rng(1.0), previous_delay=1e308) == 20.0


def test_decorrelated_jitter_without_previous_delay_uses_the_previous_unjittered_delay():
    policy = RetryPolicy(jitter=Jitter.DECORRELATED, initial_delay=1, max_delay=300)

    # The first retry: previous stands in as initial, so uniform(1, 3).
    assert policy.next_delay(1, rng=fixed_rng(1.0)) == 3.0
    # After 4 failures: the un-jittered delay of attempt 3 is 4 s, so uniform(1, 12).
    assert policy.next_delay(4, rng=fixed_rng(1.0)) == 12.0
    # A nonsense previous delay is treated as absent.
    assert policy.next_delay(4, rng=fixed_rng(1.0), previous_delay=float("nan")) == 12.0


def test_immediate_ignores_jitter():
    for jitter in Jitter:
        assert RetryPolicy(backoff=Backoff.IMMEDIATE, jitter=jitter).next_delay(5, rng=fixed_rng(1.0)) == 0.0


@pytest.mark.parametrize("u", [-1.0, 2.0, float("nan"), float("inf")])
def test_an_rng_outside_zero_to_one_cannot_push_a_delay_out_of_bounds(u):
    for jitter in (Jitter.FULL, Jitter.EQUAL, Jitter.DECORRELATED):
        delay = RetryPolicy(jitter=jitter, max_delay=10).next_delay(3, rng=fixed_rng(u))
        assert 0.0 <= delay <= 10.0


def test_a_seeded_random_gives_the_same_delays():
    policy = RetryPolicy(jitter=Jitter.FULL)

    first = [policy.next_delay(n, rng=random.Random(42)) for n in range(1, 10)]
    again = [policy.next_delay(n, rng=random.Random(42)) for n in range(1, 10)]

    assert first == again


def test_without_an_rng_the_module_random_is_used_within_bounds():
    policy = RetryPolicy(jitter=Jitter.FULL, initial_delay=1, max_delay=8)

    assert all(0.0 <= policy.next_delay(4) <= 8.0 for _ in range(100))


# --- properties ---------------------------------------------------------------------------------------------------


ANY_JITTER = st.sampled_from(Jitter)


@st.composite
def policies(draw: st.DrawFn, jitter: st.SearchStrategy[Jitter] = ANY_JITTER) -> RetryPolicy:
    backoff = draw(st.sampled_from(Backoff))
    low = 0.0 if backoff in (Backoff.FIXED, Backoff.IMMEDIATE) else 1e-6
    initial = draw(st.floats(min_value=low, max_value=1e6))
    cap = draw(st.floats(min_value=initial, max_value=1e9))
    return RetryPolicy(
        backoff=backoff,
        jitter=draw(jitter),
        initial_delay=initial,
        max_delay=cap,
        multiplier=draw(st.floats(min_value=1.0, max_value=100.0)),
    )


attempts = st.integers(min_value=-5, max_value=10**30)
unit = st.floats(min_value=0.0, max_value=1.0)


@given(policy=policies(), attempt=attempts, u=unit, previous=st.none() | st.floats(min_value=0, max_value=1e308))
def test_every_delay_is_between_zero_and_the_cap(policy, attempt, u, previous):
    delay = policy.next_delay(attempt, rng=fixed_rng(u), previous_delay=previous)

    assert 0.0 <= delay <= policy.max_delay


@given(policy=policies(jitter=st.sampled_from([Jitter.FULL, Jitter.EQUAL])), attempt=attempts, u=unit)
def test_full_and_equal_jitter_never_exceed_the_unjittered_delay(policy, attempt, u):
    plain = dataclasses.replace(policy, jitter=Jitter.NONE).next_delay(attempt)
    delay = policy.next_delay(attempt, rng=fixed_rng(u))

    assert delay <= plain
    if policy.jitter is Jitter.EQUAL:
        assert delay >= plain / 2


@given(policy=policies(jitter=st.just(Jitter.DECORRELATED)), attempt=attempts, u=unit)
def test_decorrelated_jitter_never_goes_below_the_initial_delay(policy, attempt, u):
    if policy.backoff is not Backoff.IMMEDIATE:
        assert policy.next_delay(attempt, rng=fixed_rng(u)) >= policy.initial_delay


@given(policy=policies(jitter=st.just(Jitter.NONE)), attempt=st.integers(min_value=1, max_value=10**30))
def test_without_jitter_delays_never_decrease(policy, attempt):
    assert policy.next_delay(attempt) <= policy.next_delay(attempt + 1)


@given(policy=policies(jitter=st.just(Jitter.NONE)), attempt=st.integers(min_value=1, max_value=10**30))
def test_without_jitter_exponential_and_linear_reach_the_cap_and_stay(policy, attempt):
    big = policy.next_delay(10**18)
    # Attempts are clamped (at _ATTEMPT_CEILING), so a multiplier a hair above 1 may never reach the cap.
    reachable = policy.backoff is Backoff.LINEAR or (
        policy.backoff is Backoff.EXPONENTIAL
        and policy.multiplier > 1
        and (_ATTEMPT_CEILING - 1) * math.log(policy.multiplier)
        >= math.log(policy.max_delay) - math.log(policy.initial_delay)
    )
    if policy.backoff in (Backoff.EXPONENTIAL, Backoff.LINEAR) and reachable:
        assert big == policy.max_delay
    assert policy.next_delay(attempt) <= big


@given(policy=policies(), attempt=attempts, seed=st.integers())
def test_the_same_seed_gives_the_same_delay(policy, attempt, seed):
    assert policy.next_delay(attempt, rng=random.Random(seed)) == policy.next_delay(attempt, rng=random.Random(seed))


# --- limits: exhausted and too_old -----------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "expected"), [(0, False), (4, False), (5, True), (6, True)])
def test_exhausted_exactly_at_max_attempts(attempts, expected):
    assert RetryPolicy(max_attempts=5).exhausted(attempts) is expected


@pytest.mark.parametrize(("age_ms", "expected"), [(0, False), (59_999, False), (60_000, True), (60_001, True)])
def test_too_old_exactly_at_max_age(age_ms, expected):
    first_failure = 1_700_000_000_000

    assert RetryPolicy(max_age=60).too_old(first_failure, first_failure + age_ms) is expected


def test_no_max_age_is_never_too_old():
    assert not RetryPolicy(max_age=None).too_old(0, 10**15)


def test_a_first_failure_in_the_future_from_clock_skew_is_not_too_old():
    assert not RetryPolicy(max_age=1).too_old(first_failure_ms=10_000, now_ms=0)


# --- per-topic policies and the override order -----------------------------------------------------------------


FAST = RetryPolicy(backoff=Backoff.FIXED, initial_delay=1, jitter=Jitter.NONE)
SLOW = RetryPolicy(backoff=Backoff.FIXED, initial_delay=60, jitter=Jitter.NONE)


def test_a_topic_override_wins_over_the_default():
    policies = TopicPolicies(default=FAST, topics={"payments": SLOW})

    assert policies.for_topic("payments") is SLOW
    assert policies.for_topic("orders") is FAST
    assert policies.for_topic(None) is FAST


def test_the_default_topic_policies_use_the_default_policy():
    assert TopicPolicies().for_topic("anything") == RetryPolicy()


def test_topic_policies_are_a_snapshot_of_the_mapping_given():
    topics = {"payments": SLOW}
    policies = TopicPolicies(default=FAST, topics=topics)

    topics["orders"] = SLOW

    assert policies.for_topic("orders") is FAST
    with pytest.raises(TypeError):
        policies.topics["orders"] = SLOW  # type: ignore[index]


def test_topic_policies_reject_something_that_is_not_a_policy():
    with pytest.raises(ConfigError, match=r"topics\['payments'\]"):
        TopicPolicies(topics={"payments": {"max_attempts": 3}})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="default"):
        TopicPolicies(default=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("override", [30, 30.0, "30", b"30", b" 30 ", timedelta(seconds=30)])
def test_a_record_override_wins_over_topic_and_default(override):
    policies = TopicPolicies(default=FAST, topics={"payments": SLOW})

    assert resolve_delay(policies, "payments", 1, override=override) == 30.0
    assert resolve_delay(policies, "orders", 1, override=override) == 30.0


def test_without_override_the_topic_policy_then_the_default_decides():
    policies = TopicPolicies(default=FAST, topics={"payments": SLOW})

    assert resolve_delay(policies, "payments", 1) == 60.0
    assert resolve_delay(policies, "orders", 1) == 1.0


def test_a_record_override_is_explicit_so_it_is_not_capped():
    policies = TopicPolicies(default=RetryPolicy(max_delay=10))

    assert resolve_delay(policies, "orders", 1, override=3600) == 3600.0


def test_a_negative_record_override_means_now():
    assert resolve_delay(TopicPolicies(default=SLOW), "orders", 1, override=b"-5") == 0.0


@pytest.mark.parametrize("bad", [b"soon", "", b"\xff\xfe", "nan", "inf", float("nan"), float("inf"), True])
def test_an_unusable_record_override_falls_back_to_the_policy(bad):
    policies = TopicPolicies(default=FAST, topics={"payments": SLOW})

    assert resolve_delay(policies, "payments", 1, override=bad) == 60.0


def test_resolve_delay_passes_rng_and_previous_delay_to_the_policy():
    policies = TopicPolicies(default=RetryPolicy(jitter=Jitter.DECORRELATED, initial_delay=1))

    assert resolve_delay(policies, "orders", 3, rng=fixed_rng(1.0), previous_delay=10) == 30.0


# --- the examples in the docstrings are true -------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(policy_module, optionflags=doctest.ELLIPSIS)

    assert result.attempted > 0
    assert result.failed == 0
