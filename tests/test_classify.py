"""Classifier: retry or park, and why, as a specification. Pure: exceptions, strings and numbers in, a Decision out."""

from __future__ import annotations

import doctest
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kafka_dlq import classify as classify_module
from kafka_dlq.classify import Classifier, Decision, FailureContext, qualified_name, undecodable
from kafka_dlq.errors import ConfigError
from kafka_dlq.outcomes import Outcome, ParkNow, Reason, RetryLater
from kafka_dlq.policy import RetryPolicy
from kafka_dlq.records import Failure

NOW = 1_700_000_000_000
POLICY = RetryPolicy(max_attempts=3, max_age=3600)


def decide(
    classifier: Classifier,
    error: BaseException | Failure,
    *,
    policy: RetryPolicy = POLICY,
    attempts: int = 1,
    age_ms: int | None = 0,
    has_processor: bool = True,
    repeat_failures: int = 0,
) -> Decision:
    return classifier.classify(
        error,
        policy=policy,
        attempts=attempts,
        first_failure_ms=None if age_ms is None else NOW - age_ms,
        now_ms=NOW,
        has_processor=has_processor,
        repeat_failures=repeat_failures,
    )


def retried(decision: Decision) -> bool:
    return decision.outcome is Outcome.RETRY


class Permanent(Exception):
    retryable = False


class Transient(Exception):
    retryable = True


class StillPermanent(Permanent):
    pass


class Outer:
    class Nested(Exception):
        pass


# --- qualified names --------------------------------------------------------------------------------------------


def test_qualified_name_of_builtin_and_custom_classes_and_instances():
    assert qualified_name(ValueError) == "builtins.ValueError"
    assert qualified_name(ValueError("x")) == "builtins.ValueError"
    assert qualified_name(Permanent()) == f"{__name__}.Permanent"
    assert qualified_name(Outer.Nested) == f"{__name__}.Outer.Nested"


# --- Decision ---------------------------------------------------------------------------------------------------


def test_decision_factories_build_valid_decisions():
    retry = Decision.retry("later", delay=5)
    park = Decision.park(Reason.MANUAL, "by hand")

    assert (retry.outcome, retry.reason, retry.delay, retry.parked) == (Outcome.RETRY, None, 5, False)
    assert (park.outcome, park.reason, park.delay, park.parked) == (Outcome.PARKED, Reason.MANUAL, None, True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"outcome": Outcome.RECOVERED},
        {"outcome": Outcome.RETRY, "reason": Reason.MANUAL},
        {"outcome": Outcome.RETRY, "delay": -1.0},
        {"outcome": Outcome.RETRY, "delay": float("nan")},
        {"outcome": Outcome.PARKED},
        {"outcome": Outcome.PARKED, "reason": "manual"},
        {"outcome": Outcome.PARKED, "reason": Reason.MANUAL, "delay": 1.0},
    ],
)
def test_an_inconsistent_decision_is_refused(kwargs):
    with pytest.raises(ConfigError):
        Decision(**kwargs)


def test_undecodable_records_are_parked_with_reason_undecodable():
    decision = undecodable("value is not valid JSON")

    assert decision.parked
    assert decision.reason is Reason.UNDECODABLE
    assert decision.detail == "value is not valid JSON"


# --- unknown errors retry, until the limits ---------------------------------------------------------------------


def test_an_unknown_exception_is_retried_with_the_policys_delay():
    decision = decide(Classifier(), RuntimeError("boom"))

    assert retried(decision)
    assert decision.reason is None
    assert decision.delay is None
    assert "builtins.RuntimeError" in decision.detail


def test_an_unknown_error_read_from_a_dead_letter_is_retried():
    assert retried(decide(Classifier(), Failure(error_class="java.lang.IllegalStateException", message="x")))


def test_a_dead_letter_with_no_error_details_is_retried():
    assert retried(decide(Classifier(), Failure()))


@pytest.mark.parametrize(("attempts", "parked"), [(1, False), (2, False), (3, True), (4, True)])
def test_max_attempts_parks_exactly_at_the_limit(attempts, parked):
    # Given the seed's "max 2 retries": max_attempts=3 counts the first delivery and two retries.
    decision = decide(Classifier(), RuntimeError(), attempts=attempts)

    assert decision.parked is parked
    if parked:
        assert decision.reason is Reason.MAX_ATTEMPTS


@pytest.mark.parametrize(("age_ms", "parked"), [(0, False), (3_599_999, False), (3_600_000, True)])
def test_max_age_parks_exactly_at_the_limit(age_ms, parked):
    decision = decide(Classifier(), RuntimeError(), age_ms=age_ms)

    assert decision.parked is parked
    if parked:
        assert decision.reason is Reason.MAX_AGE


def test_max_age_is_skipped_when_the_first_failure_time_is_unknown():
    assert retried(decide(Classifier(), RuntimeError(), age_ms=None))


def test_max_age_is_checked_before_max_attempts():
    decision = decide(Classifier(), RuntimeError(), attempts=3, age_ms=3_600_000)

    assert decision.reason is Reason.MAX_AGE


def test_without_limits_an_unknown_error_retries_forever():
    unlimited = RetryPolicy(max_attempts=None, max_age=None)

    assert retried(decide(Classifier(), RuntimeError(), policy=unlimited, attempts=10**9, age_ms=10**12))


# --- the processor's own word -----------------------------------------------------------------------------------


def test_park_now_parks_with_its_reason():
    decision = decide(Classifier(), ParkNow("customer deleted", reason=Reason.NON_RETRYABLE))

    assert decision.reason is Reason.NON_RETRYABLE
    assert "customer deleted" in decision.detail


def test_park_now_with_a_reason_value_as_text_uses_that_reason():
    assert decide(Classifier(), ParkNow(reason="max_age")).reason is Reason.MAX_AGE


def test_park_now_with_free_text_parks_as_manual_and_keeps_the_text():
    decision = decide(Classifier(), ParkNow("gone", reason="customer closed the account"))

    assert decision.reason is Reason.MANUAL
    assert "customer closed the account" in decision.detail


def test_retry_later_retries_with_its_delay():
    decision = decide(Classifier(), RetryLater("rate limited", delay=30))

    assert retried(decision)
    assert decision.delay == 30


@pytest.mark.parametrize(("delay", "expected"), [(None, None), (-5, 0.0), (float("nan"), None), (float("inf"), None)])
def test_retry_later_without_a_usable_delay_leaves_it_to_the_policy(delay, expected):
    assert decide(Classifier(), RetryLater(delay=delay)).delay == expected


def test_retry_later_still_stops_at_max_attempts():
    decision = decide(Classifier(), RetryLater(delay=1), attempts=3)

    assert decision.reason is Reason.MAX_ATTEMPTS


def test_retry_later_still_stops_at_max_age():
    decision = decide(Classifier(), RetryLater(delay=1), attempts=1, age_ms=3_600_000)

    assert decision.reason is Reason.MAX_AGE


def test_retry_later_within_the_limits_skips_the_judging_of_the_error():
    classifier = Classifier(non_retryable=[RetryLater], non_retryable_patterns=["later"])

    decision = decide(classifier, RetryLater("later", delay=5), attempts=2, age_ms=1000)

    assert retried(decision) and decision.delay == 5


@given(attempts=st.integers(min_value=1, max_value=10**6), age_ms=st.integers(min_value=0, max_value=10**12))
def test_retry_later_never_retries_past_a_limit(attempts, age_ms):
    decision = decide(Classifier(), RetryLater(delay=1), attempts=attempts, age_ms=age_ms)

    assert retried(decision) == (attempts < POLICY.max_attempts and age_ms < 3_600_000)


# --- no processor and repeat offenders --------------------------------------------------------------------------


def test_no_processor_parks_with_no_processor():
    assert decide(Classifier(), RuntimeError(), has_processor=False).reason is Reason.NO_PROCESSOR


@pytest.mark.parametrize(("repeat_failures", "parked"), [(0, False), (2, False), (3, True), (7, True)])
def test_repeat_offender_parks_exactly_at_the_threshold(repeat_failures, parked):
    decision = decide(Classifier(repeat_offender_threshold=3), RuntimeError(), repeat_failures=repeat_failures)

    assert decision.parked is parked
    if parked:
        assert decision.reason is Reason.REPEAT_OFFENDER


def test_repeat_offender_detection_can_be_turned_off():
    assert retried(decide(Classifier(repeat_offender_threshold=None), RuntimeError(), repeat_failures=100))


# --- classes: lists, subclasses, names, the retryable attribute -------------------------------------------------


def test_a_non_retryable_class_parks_its_instances_and_subclasses():
    classifier = Classifier(non_retryable=[LookupError])

    assert decide(classifier, LookupError()).reason is Reason.NON_RETRYABLE
    assert decide(classifier, KeyError("id")).reason is Reason.NON_RETRYABLE
    assert retried(decide(classifier, ValueError()))


def test_a_non_retryable_name_matches_an_instance_through_its_mro():
    classifier = Classifier(non_retryable=["builtins.LookupError"])

    assert decide(classifier, IndexError()).reason is Reason.NON_RETRYABLE


def test_a_non_retryable_name_matches_a_dead_letters_class_name_exactly():
    classifier = Classifier(non_retryable=["java.lang.NullPointerException"])

    npe = Failure(error_class="java.lang.NullPointerException", message="null")
    other = Failure(error_class="java.lang.NullPointerExceptionWrapper", message="null")
    short = Failure(error_class="NullPointerException", message="null")
    assert decide(classifier, npe).reason is Reason.NON_RETRYABLE
    assert retried(decide(classifier, other))
    assert retried(decide(classifier, short))


def test_a_configured_class_matches_a_dead_letter_carrying_its_qualified_name():
    classifier = Classifier(non_retryable=[Permanent, KeyError])

    assert decide(classifier, Failure(error_class="builtins.KeyError")).reason is Reason.NON_RETRYABLE
    assert decide(classifier, Failure(error_class=f"{__name__}.Permanent")).parked


def test_a_dead_letters_class_name_has_no_mro_so_a_subclass_name_does_not_match():
    classifier = Classifier(non_retryable=[LookupError])

    assert retried(decide(classifier, Failure(error_class="builtins.KeyError")))


def test_the_most_specific_class_wins_between_the_lists():
    # Given OS errors are permanent, except timeouts.
    classifier = Classifier(non_retryable=[OSError], retryable=[TimeoutError])

    assert decide(classifier, FileNotFoundError()).reason is Reason.NON_RETRYABLE
    assert retried(decide(classifier, TimeoutError()))


def test_the_most_specific_class_wins_the_other_way_round_too():
    classifier = Classifier(non_retryable=[TimeoutError], retryable=[OSError])

    assert decide(classifier, TimeoutError()).reason is Reason.NON_RETRYABLE
    assert retried(decide(classifier, FileNotFoundError()))


def test_a_class_in_both_lists_is_a_config_error():
    with pytest.raises(ConfigError, match=r"builtins\.KeyError"):
        Classifier(non_retryable=[KeyError], retryable=["builtins.KeyError"])


def test_a_retryable_false_attribute_parks_and_is_inherited():
    assert decide(Classifier(), Permanent()).reason is Reason.NON_RETRYABLE
    assert decide(Classifier(), StillPermanent()).reason is Reason.NON_RETRYABLE


def test_a_retryable_true_attribute_shields_from_patterns_and_the_rule():
    classifier = Classifier(non_retryable_patterns=["invalid"], rule=lambda _: Decision.park(Reason.MANUAL))

    assert retried(decide(classifier, Transient("invalid input")))


def test_a_retryable_class_still_parks_at_the_limits():
    classifier = Classifier(retryable=[TimeoutError])

    assert decide(classifier, TimeoutError(), attempts=3).reason is Reason.MAX_ATTEMPTS
    assert decide(classifier, TimeoutError(), age_ms=3_600_000).reason is Reason.MAX_AGE


def test_the_operators_list_beats_the_attribute_on_the_same_class():
    assert retried(decide(Classifier(retryable=[Permanent]), Permanent()))
    assert decide(Classifier(non_retryable=[Transient]), Transient()).reason is Reason.NON_RETRYABLE


def test_a_subclass_attribute_beats_a_listed_base_class():
    class FlakyLookup(LookupError):
        retryable = True

    assert retried(decide(Classifier(non_retryable=[LookupError]), FlakyLookup()))


def test_a_listed_subclass_beats_a_base_class_attribute():
    assert retried(decide(Classifier(retryable=[StillPermanent]), StillPermanent()))


def test_an_inherited_attribute_counts_at_the_class_that_defines_it():
    # Given Permanent says retryable = False and the operator lists Permanent as retryable: the operator's word
    # holds for its subclasses too, since the attribute only speaks where it is defined.
    assert retried(decide(Classifier(retryable=[Permanent]), StillPermanent()))


def test_a_retryable_attribute_that_is_not_a_bool_is_ignored():
    class Odd(Exception):
        retryable = "no"

    class WithProperty(Exception):
        @property
        def retryable(self) -> bool:
            return False

    assert retried(decide(Classifier(), Odd()))
    assert retried(decide(Classifier(), WithProperty()))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"non_retryable": [int]}, "non_retryable"),
        ({"non_retryable": [""]}, "non_retryable"),
        ({"retryable": [3]}, "retryable"),
        ({"retryable": KeyError}, "retryable"),
        ({"non_retryable": "builtins.KeyError"}, "non_retryable"),
        ({"non_retryable_patterns": [""]}, "non_retryable_patterns"),
        ({"non_retryable_patterns": [re.compile(b"500")]}, "non_retryable_patterns"),
        ({"repeat_offender_threshold": 0}, "repeat_offender_threshold"),
        ({"repeat_offender_threshold": True}, "repeat_offender_threshold"),
    ],
)
def test_bad_classifier_configuration_raises_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Classifier(**kwargs)


def test_the_classifier_keeps_a_snapshot_of_its_lists_and_is_hashable():
    names: list[type[BaseException] | str] = [KeyError]
    classifier = Classifier(non_retryable=names)

    names.append(ValueError)

    assert retried(decide(classifier, ValueError()))
    assert hash(classifier) == hash(Classifier(non_retryable=[KeyError]))


# --- message patterns: whole words, never substrings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "parked"),
    [
        ("HTTP 500 error", True),
        ("500", True),
        ("status=500.", True),
        ("(500)", True),
        ("timeout after 5000ms", False),
        ("x500", False),
        ("1500 records", False),
        ("500_000", False),
    ],
)
def test_a_pattern_matches_on_word_boundaries_never_substrings(message, parked):
    classifier = Classifier(non_retryable_patterns=["500"])

    assert decide(classifier, RuntimeError(message)).parked is parked


def test_plain_patterns_are_literal_phrases_matched_without_case():
    classifier = Classifier(non_retryable_patterns=["schema mismatch", "a.b"])

    assert decide(classifier, RuntimeError("Schema Mismatch on field id")).parked
    assert not decide(classifier, RuntimeError("schema mismatched")).parked
    assert decide(classifier, RuntimeError("bad a.b value")).parked
    assert not decide(classifier, RuntimeError("bad axb value")).parked


def test_a_pattern_with_punctuation_at_its_edge_matches_next_to_a_word():
    classifier = Classifier(non_retryable_patterns=["(400)"])

    assert decide(classifier, RuntimeError("error(400)")).parked


def test_a_compiled_regex_keeps_its_flags_and_is_held_to_word_boundaries():
    classifier = Classifier(non_retryable_patterns=[re.compile(r"4\d\d"), re.compile("forbidden", re.IGNORECASE)])

    assert decide(classifier, RuntimeError("HTTP 404")).parked
    assert not decide(classifier, RuntimeError("took 4040ms")).parked
    assert decide(classifier, RuntimeError("FORBIDDEN")).parked


def test_a_regex_alternation_is_bounded_as_a_whole():
    classifier = Classifier(non_retryable_patterns=[re.compile("400|422")])

    assert decide(classifier, RuntimeError("got 422")).parked
    assert not decide(classifier, RuntimeError("got 4000")).parked


def test_patterns_apply_to_dead_letter_messages_and_tolerate_a_missing_message():
    classifier = Classifier(non_retryable_patterns=["invalid"])

    assert decide(classifier, Failure(error_class="java.lang.RuntimeException", message="invalid id")).parked
    assert retried(decide(classifier, Failure(error_class="java.lang.RuntimeException", message=None)))


def test_the_detail_names_the_pattern_that_matched():
    decision = decide(Classifier(non_retryable_patterns=["500"]), RuntimeError("HTTP 500"))

    assert "'500'" in decision.detail


digits = st.text(alphabet="0123456789", min_size=1, max_size=6)


@given(word=digits, before=digits, after=digits)
def test_a_number_pattern_never_matches_inside_a_longer_number(word, before, after):
    classifier = Classifier(non_retryable_patterns=[word])

    assert not decide(classifier, RuntimeError(f"took {before}{word}{after}ms")).parked
    assert decide(classifier, RuntimeError(f"HTTP {word} error")).parked


@given(word=st.text(min_size=1, max_size=20).filter(str.strip), pad=st.sampled_from([" ", ": ", "\n", "("]))
def test_any_plain_pattern_matches_itself_standing_alone(word, pad):
    classifier = Classifier(non_retryable_patterns=[word])

    assert decide(classifier, RuntimeError(f"x{pad}{word.strip()}{pad[::-1]}")).parked


# --- the user rule ----------------------------------------------------------------------------------------------


def test_a_rule_decision_is_final():
    classifier = Classifier(rule=lambda ctx: Decision.park(Reason.MANUAL, "rule says so"))

    assert decide(classifier, RuntimeError()).detail == "rule says so"


def test_a_rule_returning_none_lets_the_built_in_rules_go_on():
    classifier = Classifier(rule=lambda ctx: None)

    assert retried(decide(classifier, RuntimeError()))
    assert decide(classifier, RuntimeError(), attempts=3).reason is Reason.MAX_ATTEMPTS


def test_a_rule_sees_the_same_facts_for_an_exception_and_a_dead_letter():
    seen: list[FailureContext] = []

    def rule(context: FailureContext) -> Decision | None:
        seen.append(context)
        return None

    classifier = Classifier(rule=rule)
    error = KeyError("id")
    decide(classifier, error, attempts=2, age_ms=1500)
    decide(classifier, Failure(error_class="builtins.KeyError", message="'id'"), attempts=2, age_ms=1500)

    assert seen[0] == FailureContext(
        exception=error, error_class="builtins.KeyError", message="'id'", attempts=2, age_ms=1500
    )
    assert seen[1] == FailureContext(
        exception=None, error_class="builtins.KeyError", message="'id'", attempts=2, age_ms=1500
    )


def test_a_rule_can_retry_past_the_limits_because_its_decision_is_final():
    classifier = Classifier(rule=lambda ctx: Decision.retry("always", delay=60))

    decision = decide(classifier, RuntimeError(), attempts=99)

    assert retried(decision)
    assert decision.delay == 60


def test_a_rule_returning_something_else_is_a_config_error():
    classifier = Classifier(rule=lambda ctx: True)  # type: ignore[arg-type,return-value]

    with pytest.raises(ConfigError, match="rule"):
        decide(classifier, RuntimeError())


def test_a_rule_that_raises_propagates():
    def broken(context: FailureContext) -> Decision | None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        decide(Classifier(rule=broken), RuntimeError())


# --- rule order -------------------------------------------------------------------------------------------------


def test_rules_run_in_the_documented_order():
    # Given a failure that every rule would decide on, each removal of the winning rule's trigger hands the
    # decision to the next rule in order.
    classifier = Classifier(
        non_retryable=[KeyError],
        non_retryable_patterns=["bad"],
        rule=lambda ctx: Decision.park(Reason.MANUAL, "rule") if ctx.error_class == "builtins.ValueError" else None,
        repeat_offender_threshold=1,
    )
    everything = {"attempts": 3, "age_ms": 3_600_000, "has_processor": False, "repeat_failures": 1}

    assert decide(classifier, ParkNow("bad", reason=Reason.MANUAL), **everything).reason is Reason.MANUAL
    assert decide(classifier, RetryLater("bad"), **everything).reason is Reason.MAX_AGE  # only the limits apply
    assert retried(decide(classifier, RetryLater("bad"), **{**everything, "attempts": 1, "age_ms": 0}))
    assert decide(classifier, KeyError("bad"), **everything).reason is Reason.NO_PROCESSOR
    everything["has_processor"] = True
    assert decide(classifier, KeyError("bad"), **everything).reason is Reason.REPEAT_OFFENDER
    everything["repeat_failures"] = 0
    assert decide(classifier, KeyError("bad"), **everything).detail == "builtins.KeyError is listed non-retryable"
    assert decide(classifier, ValueError("bad"), **everything).detail == "message matches non-retryable pattern 'bad'"
    assert decide(classifier, ValueError("good"), **everything).detail == "rule"
    assert decide(classifier, RuntimeError("good"), **everything).reason is Reason.MAX_AGE
    everything["age_ms"] = 0
    assert decide(classifier, RuntimeError("good"), **everything).reason is Reason.MAX_ATTEMPTS
    everything["attempts"] = 1
    assert retried(decide(classifier, RuntimeError("good"), **everything))


def test_a_non_retryable_class_beats_the_rule_and_patterns():
    classifier = Classifier(non_retryable=[KeyError], rule=lambda ctx: Decision.retry("rule"))

    assert decide(classifier, KeyError()).reason is Reason.NON_RETRYABLE


# --- robustness -------------------------------------------------------------------------------------------------


def test_an_exception_whose_str_raises_is_still_classified():
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    classifier = Classifier(non_retryable_patterns=["x"])

    assert retried(decide(classifier, Broken()))


def test_attempts_zero_from_a_format_that_does_not_count_is_retried():
    assert retried(decide(Classifier(), Failure(error_class="x.Y"), attempts=0))


# --- the examples in the docstrings are true -------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(classify_module)

    assert result.attempted > 0
    assert result.failed == 0
