"""The ops API's JSON endpoints: ``GET /api/stats``, ``GET /api/peek`` and ``POST /api/redrive``.

Each runs the library's own async function (:func:`~kafka_dlq.stats.collect_stats`, :func:`~kafka_dlq.redrive.peek`,
:func:`~kafka_dlq.redrive.redrive`) on the app's event loop; their Kafka clients work on threads of their own, so
nothing blocks the loop (or the handler sharing it).

**Access.** With a token configured, every ``/api`` call needs ``Authorization: Bearer <token>``: missing or wrong
is 401 (with ``WWW-Authenticate``), checked before the request is read any further, so nothing happens. Without a
token, the reading calls (stats, peek, dry-run redrive) are open, as ``/metrics`` is, and a real redrive is off:
403, whatever the credentials. ``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` are always open.

**Bounds.** A request's work is bounded: peek returns 1000 records at most; stats reads 20 topics at most; a real
redrive sends at most ``rate`` records per second (default :data:`DEFAULT_RATE`); at most
:data:`MAX_READS` reading calls run at once (429 beyond) and one real redrive (409 while one runs); a body is
64 KiB at most. A redrive keeps going when its caller hangs up: its runs are exactly once and resumable, so the
same call again continues (or finds nothing left).

**Errors** are JSON ``{"error": "...", "field": "..."}``: 400 for a body that is not JSON, 422 for a value that
breaks a rule (the message says which and what is accepted), 404 for a topic that does not exist, 502 or 503 when
Kafka fails or cannot be reached.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kafka_dlq.errors import BrokerUnreachableError, ConfigError, KafkaDLQError, TopicNotFoundError
from kafka_dlq.filters import RecordFilter, check_resumable, parse_header, parse_offsets, parse_time
from kafka_dlq.redrive import DEFAULT_MAX_REDRIVES, SAMPLES, Guarantee, peek, redrive
from kafka_dlq.stats import collect_stats
from kafka_dlq.web.params import ApiError, Kind, Param, parse_body, parse_query

__all__ = [
    "DEFAULT_RATE",
    "MAX_BODY_BYTES",
    "MAX_READS",
    "PEEK",
    "REDRIVE",
    "STATS",
    "OpsApi",
    "check_token",
]

log = logging.getLogger("kafka_dlq.web")

DEFAULT_RATE = 1000.0
"""Records per second a real redrive sends when the call names no rate: a flood of redriven records would hit the
original topics' consumers all at once."""
MAX_READS = 4
"""Reading calls (stats, peek, dry runs) running at once; each holds a Kafka client and its thread."""
MAX_BODY_BYTES = 64 * 1024
MIN_TOKEN_LENGTH = 16
MAX_MOMENT = 253_402_300_799_999
"""The last millisecond of year 9999: later (or before 1970) is no time a record has."""
MAX_OFFSET = 2**63 - 1

# A legal Kafka topic name: 1 to 249 of these characters, but not "." or ".." (written without a lookahead, so
# that the OpenAPI document's generators and ECMA-262 read it as Python does).
TOPIC_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,248}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,247}|\.\.[A-Za-z0-9._-]{1,247}"
TOPIC_RULE = "a Kafka topic name: 1 to 249 letters, digits, '.', '_' or '-' (not '.' or '..')"
GROUP_PATTERN = r"[^\x00-\x1f\x7f]{1,249}"
GROUP_RULE = "1 to 249 characters, none of them a control character"
_TIME = "ISO-8601 (2024-05-01T12:00:00Z), epoch seconds or milliseconds, or a duration ago (30m, 2h, 7d)"


def _filter_params(plural: bool) -> list[Param]:
    """The record filter's parameters: singular names repeated in a query string, plural lists in a JSON body."""

    def name(one: str, many: str) -> str:
        return many if plural else one

    return [
        Param(name="since", kind=Kind.STRING, max_length=64, description=f"Dead letters written at or after: {_TIME}."),
        Param(name="until", kind=Kind.STRING, max_length=64, description="Dead letters written before (as since)."),
        Param(
            name=name("partition", "partitions"),
            kind=Kind.INTEGER,
            many=True,
            minimum=0,
            maximum=1_000_000,
            max_items=100,
            description="DLQ partitions.",
        ),
        Param(
            name="offsets",
            kind=Kind.STRING,
            max_length=64,
            description="DLQ offsets, inclusive: FIRST-LAST, FIRST-, -LAST or one offset.",
        ),
        Param(
            name=name("original_topic", "original_topics"),
            kind=Kind.STRING,
            many=True,
            max_length=249,
            max_items=50,
            description="Topics the records failed on.",
        ),
        Param(
            name=name("error_class", "error_classes"),
            kind=Kind.STRING,
            many=True,
            max_length=512,
            max_items=50,
            description="Error classes, qualified (builtins.KeyError) or not (KeyError).",
        ),
        Param(
            name="error_pattern",
            kind=Kind.STRING,
            max_length=256,
            description="A Python regular expression searched, in any case, in the error class and message.",
        ),
        Param(
            name=name("key", "keys"),
            kind=Kind.STRING,
            many=True,
            max_length=4096,
            max_items=100,
            description="Original keys (UTF-8).",
        ),
        Param(
            name=name("header", "headers"),
            kind=Kind.STRING,
            many=True,
            max_length=4096,
            max_items=20,
            description="Headers the records carry: NAME=VALUE, or NAME for any value; all must match.",
        ),
    ]


STATS = [
    Param(
        name="topic",
        kind=Kind.STRING,
        many=True,
        required=True,
        pattern=TOPIC_PATTERN,
        rule=TOPIC_RULE,
        min_items=1,
        max_items=20,
        description="Dead-letter or poison topics to count.",
    ),
    Param(
        name="group",
        kind=Kind.STRING,
        pattern=GROUP_PATTERN,
        rule=GROUP_RULE,
        description="Consumer group whose lag to show (default: the handler's, when the app has one).",
    ),
]
PEEK = [
    Param(
        name="topic",
        kind=Kind.STRING,
        required=True,
        pattern=TOPIC_PATTERN,
        rule=TOPIC_RULE,
        description="The topic to read.",
    ),
    Param(name="limit", kind=Kind.INTEGER, minimum=1, maximum=1000, default=20, description="Records, at most."),
    Param(
        name="max_bytes",
        kind=Kind.INTEGER,
        minimum=1,
        maximum=65536,
        default=4096,
        description="Longer keys, values and headers are cut to this many bytes.",
    ),
    *_filter_params(plural=False),
]
REDRIVE = [
    Param(
        name="topic",
        kind=Kind.STRING,
        required=True,
        pattern=TOPIC_PATTERN,
        rule=TOPIC_RULE,
        description="The DLQ topic to read.",
    ),
    Param(
        name="to",
        kind=Kind.STRING,
        pattern=TOPIC_PATTERN,
        rule=TOPIC_RULE,
        description="Send here instead of each record's original topic.",
    ),
    Param(
        name="dry_run",
        kind=Kind.BOOLEAN,
        default=True,
        description="Send nothing, commit nothing: count what a run would send where, with samples.",
    ),
    Param(
        name="rate",
        kind=Kind.NUMBER,
        above=0,
        maximum=1_000_000,
        description=f"Records sent per second, at most (a real redrive's default: {DEFAULT_RATE:g}).",
    ),
    Param(
        name="max_redrives",
        kind=Kind.INTEGER,
        minimum=1,
        maximum=100,
        default=DEFAULT_MAX_REDRIVES,
        description="Loop guard: refuse a dead letter already redriven this many times.",
    ),
    Param(
        name="guarantee",
        kind=Kind.STRING,
        choices=tuple(g.value for g in Guarantee),
        default=Guarantee.EXACTLY_ONCE.value,
        description="exactly-once (transactions) or at-least-once (may repeat records).",
    ),
    Param(
        name="sample",
        kind=Kind.INTEGER,
        minimum=0,
        maximum=SAMPLES,
        default=5,
        description="Records a dry run shows.",
    ),
    Param(
        name="group",
        kind=Kind.STRING,
        pattern=GROUP_PATTERN,
        rule=GROUP_RULE,
        description="The run's consumer group (default: one per topic, filter, destination and limit, so the same "
        "call again resumes). A real redrive with a relative since or until (2h) needs one: the range moves.",
    ),
    *_filter_params(plural=True),
]


def check_token(token: str | None) -> str | None:
    """The API token as given, once checked: long enough to resist guessing, and sendable in a header.

    >>> check_token(None) is None, check_token("x" * 16) == "x" * 16
    (True, True)
    """
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH or not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(
            f"the HTTP token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without spaces: "
            "make one with python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


class _Json(JSONResponse):
    """Starlette's JSON response, which also shows a record's NaN or Infinity (JSON has neither) as text."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # allow_nan=False: a peeked value held NaN or Infinity
            return super().render(_finite(content))


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_finite(value) for value in data]
    return data


def _error(exc: ApiError) -> Response:
    return _Json(exc.to_json(), status_code=exc.status, headers=exc.headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _answers(work: Endpoint) -> Endpoint:
    """``work`` with the library's errors answered as JSON with the status that fits them, never a bare 500."""

    async def endpoint(request: Request) -> Response:
        try:
            return await work(request)
        except ApiError as exc:
            return _error(exc)
        except ConfigError as exc:  # a value the library refused (an empty range, a bad time or pattern ...)
            return _error(ApiError(422, str(exc)))
        except TopicNotFoundError as exc:
            return _error(ApiError(404, str(exc)))
        except BrokerUnreachableError as exc:
            return _error(ApiError(503, f"Kafka cannot be reached: {exc}"))
        except KafkaDLQError as exc:  # the broker refused or failed: not the caller's fault, nor a bug here
            return _error(ApiError(502, f"Kafka failed: {exc}"))
        except Exception:
            log.exception("ops API: %s %s failed", request.method, request.url.path)
            return _error(ApiError(500, "internal error: the service log has the details"))

    return endpoint


class OpsApi:
    """The JSON endpoints for one Kafka cluster; ``routes()`` mounts them. See the module for access and bounds.

    >>> api = OpsApi(bootstrap_servers="127.0.0.1:19092", token=secrets.token_urlsafe(32))   # doctest: +SKIP
    >>> app = Starlette(routes=api.routes())                                                # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        kafka_config: Mapping[str, Any] | None = None,
        token: str | None = None,
        group: str | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.kafka_config = dict(kafka_config or {})
        self._token = check_token(token)
        self.group = group
        """The consumer group stats shows the lag of, unless the call names one."""
        self._reads = 0
        self._redriving = False

    @property
    def secured(self) -> bool:
        """True when a token is configured: every call needs it, and real redrives are on."""
        return self._token is not None

    def routes(self) -> list[Route]:
        return [
            Route("/api/stats", _answers(self.stats), methods=["GET"]),
            Route("/api/peek", _answers(self.peek), methods=["GET"]),
            Route("/api/redrive", _answers(self.redrive), methods=["POST"]),
        ]

    # ---------------------------------------------------------------- access and bounds

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "this API needs a token: send the header Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="kafka-dlq"'},
            )
        # Compared in constant time, as bytes (compare_digest takes only ASCII text, a header may hold any byte:
        # Starlette decodes headers as Latin-1, so encoding them so gives the bytes sent back).
        if not hmac.compare_digest(given.strip().encode("latin-1"), self._token.encode()):
            raise ApiError(
                401,
                "the token is not valid: send the one configured as http_token (KAFKA_DLQ_HTTP_TOKEN)",
                headers={"WWW-Authenticate": 'Bearer realm="kafka-dlq", error="invalid_token"'},
            )

    async def _reading(self, work: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
        """Run a reading call unless ``MAX_READS`` already run (no queue: a caller waiting on a busy service
        would only time out later)."""
        if self._reads >= MAX_READS:
            raise ApiError(
                429, f"{MAX_READS} reading calls are running: try again shortly", headers={"Retry-After": "1"}
            )
        self._reads += 1
        try:
            return _Json(await work())
        finally:
            self._reads -= 1

    @property
    def _config(self) -> dict[str, Any]:
        return {**self.kafka_config, "bootstrap.servers": self.bootstrap_servers}

    # ---------------------------------------------------------------- endpoints

    async def stats(self, request: Request) -> Response:
        """``GET /api/stats?topic=T[&topic=...][&group=G]``: counts by original topic, error, reason and format."""
        self._authorize(request)
        query = parse_query(request.query_params.multi_items(), STATS)

        async def work() -> dict[str, Any]:
            stats = await collect_stats(self._config, query["topic"], group=query["group"] or self.group)
            return stats.to_json()

        return await self._reading(work)

    async def peek(self, request: Request) -> Response:
        """``GET /api/peek?topic=T&limit=N`` and filters: the first matching dead letters, decoded."""
        self._authorize(request)
        query = parse_query(request.query_params.multi_items(), PEEK)
        select = _record_filter(query, plural=False)

        async def work() -> dict[str, Any]:
            report = await peek(
                self.bootstrap_servers,
                query["topic"],
                select=select,
                limit=query["limit"],
                max_bytes=query["max_bytes"],
                kafka_config=self.kafka_config,
            )
            return report.to_json()

        return await self._reading(work)

    async def redrive(self, request: Request) -> Response:
        """``POST /api/redrive`` with a JSON body: a dry run (the default) or, with a token, a real redrive.

        A real redrive with a relative ``since`` or ``until`` (``2h``) needs a ``group``: its default group is
        named after the range, which moves, so the same call again would send everything again (422 without). The
        handler's own group is refused (422): a real run would join it and commit the handler's offsets.
        """
        self._authorize(request)
        body = parse_body(await _json_body(request), REDRIVE)
        select = _record_filter(body, plural=True)
        if body["dry_run"]:
            return await self._reading(lambda: self._redrive(body, select, rate=body["rate"]))
        if not self.secured:
            raise ApiError(
                403,
                "real redrives are off: no token is configured. Set http_token (or KAFKA_DLQ_HTTP_TOKEN) to turn "
                "them on, or send dry_run: true",
            )
        for name in ("since", "until"):
            try:
                check_resumable(
                    {name: body[name]}, group=body["group"], group_option='"group": "NAME"', now_ms=_now_ms()
                )
            except ConfigError as exc:
                raise ApiError(422, str(exc), field=name) from None
        if self.group is not None and body["group"] == self.group:
            raise ApiError(
                422,
                f"group {self.group!r} is the handler's own consumer group: a redrive in it would join the handler's "
                'group and commit its offsets. Name another "group", or leave it out for the run\'s own',
                field="group",
            )
        if self._redriving:
            # Two runs of one group would fence each other's transactions; one at a time is also easier to follow.
            raise ApiError(409, "a redrive is running: try again when it has finished", headers={"Retry-After": "5"})
        self._redriving = True
        try:
            log.warning("ops API: redrive of %s requested (filter %s)", body["topic"], select.to_json())
            return _Json(await self._redrive(body, select, rate=body["rate"] or DEFAULT_RATE))
        finally:
            self._redriving = False

    async def _redrive(self, body: dict[str, Any], select: RecordFilter, *, rate: float | None) -> dict[str, Any]:
        report = await redrive(
            self.bootstrap_servers,
            body["topic"],
            select=select,
            to=body["to"],
            group=body["group"],
            rate=rate,
            max_redrives=body["max_redrives"],
            guarantee=Guarantee(body["guarantee"]),
            dry_run=body["dry_run"],
            sample=body["sample"],
            kafka_config=self.kafka_config,
        )
        return report.to_json()


def _record_filter(values: dict[str, Any], *, plural: bool) -> RecordFilter:
    """The filter the parameters describe, as the CLI builds it from its options; every value is checked here
    first, so that only a ConfigError (an empty range), never a crash, can come out of ``RecordFilter``."""

    def many(one: str, several: str) -> list[Any]:
        result: list[Any] = values[several if plural else one]
        return result

    now_ms = _now_ms()
    pattern = values["error_pattern"]
    if pattern is not None:
        try:
            re.compile(pattern, re.IGNORECASE)
        except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}: OverflowError
            raise ApiError(422, f"'error_pattern' is not a regular expression: {exc}", field="error_pattern") from None
    first, last = _offsets(values["offsets"])
    return RecordFilter(
        since=_moment("since", values["since"], now_ms),
        until=_moment("until", values["until"], now_ms),
        partitions=frozenset(many("partition", "partitions")),
        first_offset=first,
        last_offset=last,
        original_topics=tuple(many("original_topic", "original_topics")),
        error_classes=tuple(many("error_class", "error_classes")),
        error_pattern=pattern,
        keys=tuple(key.encode() for key in many("key", "keys")),
        headers=tuple(_header("headers" if plural else "header", text) for text in many("header", "headers")),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _moment(name: str, text: str | None, now_ms: int) -> int | None:
    if text is None:
        return None
    try:
        moment = parse_time(text, now_ms=now_ms)
    except ConfigError as exc:
        raise ApiError(422, f"{name!r}: {exc}", field=name) from None
    except (ValueError, OverflowError):  # "²" passes isdigit() but not int(); "9" * 400 + "w" is infinite
        raise ApiError(422, f"{name!r}: {text[:80]!r} is not a time: use {_TIME}", field=name) from None
    if not 0 <= moment <= MAX_MOMENT:
        raise ApiError(422, f"{name!r}: {text[:80]!r} is before 1970 or after 9999", field=name)
    return moment


def _offsets(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        first, last = parse_offsets(text)
    except ConfigError as exc:
        raise ApiError(422, f"'offsets': {exc}", field="offsets") from None
    for offset in (first, last):
        if offset is not None and not 0 <= offset <= MAX_OFFSET:
            raise ApiError(422, f"'offsets': {offset} is not an offset (0 to {MAX_OFFSET})", field="offsets")
    return first, last


def _header(name: str, text: str) -> tuple[str, bytes | None]:
    try:
        return parse_header(text)
    except ConfigError as exc:
        raise ApiError(422, f"{name!r}: {exc}", field=name) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def _json_body(request: Request) -> Any:
    """The request's JSON body: 415 for another media type, 413 past ``MAX_BODY_BYTES``, 400 when not JSON."""
    media = request.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"send the body as application/json, not {media[:80]!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise ApiError(400, 'the body is empty: send a JSON object, e.g. {"topic": "orders.dlq", "dry_run": true}')
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise ApiError(400, f"the body is not JSON: {str(exc)[:200]}") from None
