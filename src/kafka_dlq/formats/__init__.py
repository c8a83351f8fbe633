"""Dead-letter formats: read a dead-letter record in any supported format, write kafka-dlq's own.

Decoding is pure (a record in, a value out) and never raises: a record that cannot be read comes back as
:class:`Undecodable` with the precise reason, for the handler to park.

Each record is detected on its own, in this order (the first match decides; headers of other formats stay with
the original headers, since they were on the record before it failed):

1. native, when ``dlq.original.topic`` is present. First, because kafka-dlq writes its headers after any
   others: a Spring dead letter redriven by us that fails again is a native dead letter carrying Spring headers.
2. Spring ``DeadLetterPublishingRecoverer``: any ``kafka_dlt-*`` header.
3. Spring retry topics: any ``kafka_original-*``, ``kafka_exception-*``, ``kafka_key-exception-*`` or
   ``retry_topic-*`` header.
4. Kafka Connect (``__connect.errors.*``), Kafka Streams (``__streams.errors.*``), share groups
   (``__dlq.errors.*``).
5. native without its topic, when a ``dlq.*`` metadata header other than the three a redrive sends home is
   present (undecodable: missing original topic). ``dlq.attempts``, ``dlq.first.failure`` and
   ``dlq.redrive.count`` do not count: redrive puts them on the original record, and a system that keeps its
   headers carries them into its own dead letter when the record fails there again.
6. the seed system's JSON envelope, when the value is a JSON object with an envelope field.

Anything else is :class:`Undecodable` with ``source_format`` None. Whatever the format, the headers a redrive
sent home with the record are read as its history, not kept as original headers: ``dlq.redrive.count`` is the
redrive count, ``dlq.attempts`` is added to the format's own attempts (capped at ``MAX_ATTEMPTS``), and
``dlq.first.failure`` is the first failure when it is the earlier.
"""

from __future__ import annotations

from collections.abc import Callable

from kafka_dlq.formats import connect, native, seed, spring
from kafka_dlq.formats._common import (
    MAX_ATTEMPTS,
    MAX_MESSAGE_BYTES,
    MAX_STACKTRACE_BYTES,
    EncodedRecord,
    FormatError,
    NotThisFormat,
    SourceFormat,
    Undecodable,
    coordinates,
)
from kafka_dlq.formats.native import encode_native
from kafka_dlq.kafka.record import KafkaRecord
from kafka_dlq.records import DeadLetter

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_MESSAGE_BYTES",
    "MAX_STACKTRACE_BYTES",
    "EncodedRecord",
    "SourceFormat",
    "Undecodable",
    "decode",
    "encode_native",
]

_Decoder = Callable[[KafkaRecord], DeadLetter]

_BY_HEADERS: tuple[tuple[SourceFormat, Callable[[str], bool], _Decoder], ...] = (
    (SourceFormat.SPRING, lambda name: name.startswith(spring.DLT_PREFIX), spring.decode_spring),
    (SourceFormat.SPRING_RETRY, lambda name: name in spring.RETRY_HEADERS, spring.decode_spring_retry),
    (SourceFormat.CONNECT, lambda name: name.startswith(connect.CONNECT_PREFIX), connect.decode_connect),
    (SourceFormat.STREAMS, lambda name: name.startswith(connect.STREAMS_PREFIX), connect.decode_streams),
    (SourceFormat.SHARE_GROUP, lambda name: name.startswith(connect.SHARE_PREFIX), connect.decode_share),
)
_NATIVE_FAILURE_HEADERS = native.HEADERS - native.CARRIED


def _detect(record: KafkaRecord) -> tuple[SourceFormat, _Decoder]:
    for name, _ in record.headers:  # native first, and cheaply: it is what the handler reads most
        if name == native.TOPIC:
            return SourceFormat.NATIVE, native.decode_native
    names = {name for name, _ in record.headers}
    for source_format, marks, decoder in _BY_HEADERS:
        if any(marks(name) for name in names):
            return source_format, decoder
    if names & _NATIVE_FAILURE_HEADERS:
        return SourceFormat.NATIVE, native.decode_native
    return SourceFormat.SEED_JSON, seed.decode_seed


INTERNAL_ERROR = "internal decoder error"
"""How a reason starts when a decoder failed in a way it should not have (a bug): the record is still parked."""


def decode(record: KafkaRecord) -> DeadLetter | Undecodable:
    """Read a dead-letter record, detecting its format; never raises.

    The dead letter's ``dlq`` is the record's own topic, partition and offset, its ``original.headers`` are the
    record's headers minus the format's metadata headers, and ``source_format`` says which format it was.

    >>> record = KafkaRecord(topic="orders.dlq", partition=0, offset=7, value=b"{}",
    ...                      headers=(("dlq.original.topic", b"orders"), ("dlq.attempts", b"3")))
    >>> decode(record).attempts
    3
    >>> decode(KafkaRecord(topic="orders.dlq", partition=0, offset=8, value=b"not json")).source_format is None
    True
    """
    source_format, decoder = _detect(record)
    try:
        dead_letter = decoder(record)
        if source_format is not SourceFormat.NATIVE:
            dead_letter = native.with_carried(dead_letter, record.headers)
        return dead_letter
    except NotThisFormat as exc:
        reason = f"unknown format: no dead-letter headers, and {exc}"
        return Undecodable(reason=reason, dlq=coordinates(record))
    except FormatError as exc:
        return Undecodable(reason=str(exc), dlq=coordinates(record), source_format=source_format)
    except Exception as exc:  # a bug must park one record, not stop the handler
        reason = f"{INTERNAL_ERROR}: {type(exc).__name__}: {exc}"
        return Undecodable(reason=reason, dlq=coordinates(record), source_format=source_format)
