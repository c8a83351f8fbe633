"""The record types' hand-written constructors are the dataclasses' own: the same fields, defaults and values."""

from __future__ import annotations

import dataclasses
import inspect
from types import MappingProxyType

import pytest

from kafka_dlq.outcomes import Reason
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord


@pytest.mark.parametrize("cls", [DlqCoordinates, OriginalRecord, Failure, DeadLetter])
def test_each_record_type_takes_exactly_its_fields_by_keyword_with_their_defaults(cls):
    parameters = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)

    assert [p.name for p in parameters] == [f.name for f in fields]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    for parameter, field in zip(parameters, fields, strict=True):
        if field.default is not dataclasses.MISSING:
            assert parameter.default == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert parameter.default == field.default_factory(), field.name
        else:
            assert parameter.default is inspect.Parameter.empty, field.name


def test_a_dead_letter_holds_what_it_was_given_and_stays_frozen():
    original = OriginalRecord(topic="orders", partition=1, offset=2, timestamp=3, key=b"k", value=b"v", headers=())
    dl = DeadLetter(
        original=original,
        failure=Failure(error_class="builtins.KeyError", message="m", stacktrace="s"),
        attempts=4,
        first_failure=5,
        last_failure=6,
        group="g",
        reason=Reason.MAX_AGE,
        redrive_count=7,
        source_format="spring",
        dlq=DlqCoordinates(topic="orders.dlq", partition=0, offset=8),
        extra=MappingProxyType({"a": "b"}),
    )

    assert {f.name: getattr(dl, f.name) for f in dataclasses.fields(dl)} == {
        "original": original,
        "failure": Failure(error_class="builtins.KeyError", message="m", stacktrace="s"),
        "attempts": 4,
        "first_failure": 5,
        "last_failure": 6,
        "group": "g",
        "reason": Reason.MAX_AGE,
        "redrive_count": 7,
        "source_format": "spring",
        "dlq": DlqCoordinates(topic="orders.dlq", partition=0, offset=8),
        "extra": {"a": "b"},
    }
    assert dataclasses.replace(dl, attempts=9) == DeadLetter(
        **{**{f.name: getattr(dl, f.name) for f in dataclasses.fields(dl)}, "attempts": 9}
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        dl.attempts = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        DeadLetter(original, 1)  # type: ignore[misc]  # keyword only, as before
