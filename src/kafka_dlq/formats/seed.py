"""The seed system's JSON envelope: the record value is a JSON object describing the failed record.

Two writers existed. The handler wrote ``original_topic``, ``original_value``, ``error``, ``retry_count``,
``first_failure_time``, ``partition``, ``offset``, ``key``; the publisher wrote ``original_topic``,
``original_value``, ``error``, ``attempt_count``, ``original_partition``, ``original_offset``,
``original_timestamp``, ``original_key``. Either name of a field is read, the ``original_*`` one first.

How JSON becomes bytes and numbers:

- ``original_value`` and ``key``: a JSON string is its UTF-8 bytes; null is None; any other JSON (object, array,
  number, boolean) is its compact JSON text in UTF-8 (``separators=(",", ":")``, non-ASCII kept, key order kept).
  That is the record as the seed received it up to whitespace, which the envelope did not keep.
- times (``first_failure_time``, ``original_timestamp``): epoch seconds (int or float below 1e11), epoch
  milliseconds (from 1e11), the same as decimal text, or ISO-8601 text (no offset means UTC).
- the first failure time: ``first_failure_time``; else ``original_timestamp`` (the publisher's variant kept no
  failure time, and its record's age is what max_age judges); else the envelope record's own timestamp.
- attempts: ``attempt_count`` counted attempts; ``retry_count`` counted retries after the first failure, so it is
  one less than the failed attempts. Either is capped at ``MAX_ATTEMPTS``.
- ``error``: text, read as ``Class: message`` when it starts with an exception class name (``ValueError: ...``,
  ``csv.Error: ...``, ``app.errors.PaymentError``), else all message; or an object with ``type``/``class``,
  ``message`` and ``stacktrace``/``traceback``.

The envelope record's own headers are kept as the original headers (the format has no metadata headers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from kafka_dlq.formats._common import (
    INT32_MAX,
    MAX_ATTEMPTS,
    FormatError,
    NotThisFormat,
    SourceFormat,
    check_range,
    coordinates,
    epoch_ms,
    show,
)
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter, Failure, OriginalRecord

__all__ = ["ENVELOPE_FIELDS", "decode_seed"]

ENVELOPE_FIELDS = frozenset(
    {
        "original_topic",
        "original_value",
        "original_key",
        "original_partition",
        "original_offset",
        "original_timestamp",
        "retry_count",
        "attempt_count",
        "first_failure_time",
    }
)
"""Fields that mark a JSON object as an envelope (``error``, ``key``, ``partition`` are too common to count)."""

_DIGITS = re.compile(r"[0-9]{1,20}")
_ERROR_CLASS = re.compile(r"((?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception))(?::\s*(.*))?", re.DOTALL)
"""``Class: message`` where Class is a (dotted) name ending in Error or Exception, as ``traceback`` prints it."""


def decode_seed(record: KafkaRecord) -> DeadLetter:
    """Read a seed JSON envelope; raises ``NotThisFormat`` when the value is no envelope, ``FormatError`` when it
    is a broken one."""
    envelope = _envelope(record.value)
    topic = envelope.get("original_topic")
    if topic is None:
        raise FormatError("missing original topic (field original_topic)")
    if not isinstance(topic, str) or not topic:
        raise FormatError(f"field original_topic is not a non-empty string: {show(topic)}")
    if not topic.isprintable():  # also catches a lone surrogate escaped in the JSON, which no topic can hold
        raise FormatError(f"field original_topic is not a topic name: {show(topic)}")
    attempt_count = _integer(envelope, "attempt_count", high=MAX_ATTEMPTS)
    retry_count = _integer(envelope, "retry_count", high=MAX_ATTEMPTS - 1)
    attempts = max(1, attempt_count if attempt_count is not None else (retry_count or 0) + 1)
    first_failure = epoch_ms("field first_failure_time", envelope.get("first_failure_time"))
    original_timestamp = epoch_ms("field original_timestamp", envelope.get("original_timestamp"))
    if first_failure is None:
        # The publisher wrote no failure time: the original record's time is the age it meant (the seed handler,
        # reading only first_failure_time, lost it); the envelope's own time only when neither is there.
        first_failure = original_timestamp if original_timestamp is not None else record.timestamp
    return DeadLetter(
        original=OriginalRecord(
            topic=topic,
            partition=_integer(envelope, "original_partition", "partition", high=INT32_MAX),
            offset=_integer(envelope, "original_offset", "offset"),
            timestamp=original_timestamp,
            key=_bytes(envelope, "original_key", "key"),
            value=_bytes(envelope, "original_value"),
            headers=record.headers,
        ),
        failure=_failure(envelope),
        attempts=attempts,
        first_failure=first_failure,
        last_failure=record.timestamp,
        source_format=SourceFormat.SEED_JSON,
        dlq=coordinates(record),
    )


def _envelope(value: bytes | None) -> Mapping[str, object]:
    if not value:
        raise NotThisFormat("the value is empty")
    try:
        document = json.loads(value)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise NotThisFormat(f"the value is not JSON ({str(exc)[:120]})") from None
    if not isinstance(document, dict):
        raise NotThisFormat(f"the value is JSON but not an object ({type(document).__name__})")
    if not document.keys() & ENVELOPE_FIELDS:
        raise NotThisFormat("the value is a JSON object without any envelope field (original_topic ...)")
    return document


def _pick(envelope: Mapping[str, object], names: tuple[str, ...]) -> tuple[str, object]:
    """The first of ``names`` with a non-null value (the ``original_*`` name first), else the first name and None."""
    for name in names:
        if envelope.get(name) is not None:
            return name, envelope[name]
    return names[0], None


def _integer(envelope: Mapping[str, object], *names: str, high: int = 2**63 - 1) -> int | None:
    name, value = _pick(envelope, names)
    if value is None:
        return None
    # Lenient where nothing is lost: 3.0 and "3" are 3 (JSON writers differ); 3.5 and "three" are not.
    if (isinstance(value, float) and value.is_integer()) or (isinstance(value, str) and _DIGITS.fullmatch(value)):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"field {name} is not an integer: {show(value)}")
    return check_range(f"field {name}", value, high=high)


def _bytes(envelope: Mapping[str, object], *names: str) -> bytes | None:
    text = _field_text(envelope, names)
    try:
        return None if text is None else text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate ("\ud800"), which has no UTF-8 form
        raise FormatError(f"field {_pick(envelope, names)[0]} holds text that is not valid Unicode") from None


def _field_text(envelope: Mapping[str, object], names: tuple[str, ...], within: str = "") -> str | None:
    """A field as text: a string as is, other JSON as its compact JSON text, null as None."""
    name, value = _pick(envelope, names)
    if value is None or isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:  # loads accepted it, but dumping runs deeper in our stack
        raise FormatError(f"field {within}{name} is nested too deeply") from None


def _failure(envelope: Mapping[str, object]) -> Failure:
    error = envelope.get("error")
    if isinstance(error, dict):
        return Failure(
            error_class=_field_text(error, ("type", "class", "error_class"), "error."),
            message=_field_text(error, ("message",), "error."),
            stacktrace=_field_text(error, ("stacktrace", "traceback"), "error."),
        )
    text = _field_text(envelope, ("error",))
    match = None if text is None else _ERROR_CLASS.fullmatch(text)
    if match is None:
        return Failure(message=text)
    return Failure(error_class=match[1], message=match[2])
