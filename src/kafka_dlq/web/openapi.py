"""The ops API's OpenAPI 3.1 document, written out by hand where it describes responses and built from the same
:class:`~kafka_dlq.web.params.Param` declarations the endpoints check their input with.

It describes one app as configured: ``/metrics`` and ``/readyz`` only with a handler; the bearer scheme on every
``/api`` operation only with a token (without one, a real redrive answers 403 instead).

>>> document = openapi_document(handler=False, secured=True)
>>> sorted(document["paths"])
['/api/peek', '/api/redrive', '/api/stats', '/healthz', '/openapi.json']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka_dlq.web.api import MAX_BODY_BYTES, MAX_READS, PEEK, REDRIVE, STATS
from kafka_dlq.web.params import Param

__all__ = ["openapi_document"]

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def _counts() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "integer"}}


def _object(properties: dict[str, Any], *, optional: Sequence[str] = ()) -> dict[str, Any]:
    """An object with exactly these properties, all required but ``optional``."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


_STRINGS = {"type": "array", "items": {"type": "string"}}
_HEADER_PAIRS = {
    "type": "array",
    "items": {"type": "array", "items": _nullable("string"), "minItems": 2, "maxItems": 2},
    "description": "[name, value] pairs; a value of null: the header is present with no value (or any value).",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        **_object(
            {
                "error": {"type": "string", "description": "What is wrong and what to do."},
                "field": {"type": "string", "description": "The parameter at fault, when it is one."},
            },
            optional=["field"],
        ),
    },
    "Health": _object(
        {
            "status": {"type": "string", "enum": ["ok", "failing"]},
            "broken": _STRINGS,
            "handler": _nullable("string"),
        }
    ),
    "Ready": _object({"ready": {"type": "boolean"}, "why": {"type": "string"}}),
    "Filter": {
        **_object(
            {
                "since": {"type": "string", "description": "ISO-8601, UTC."},
                "until": {"type": "string"},
                "partitions": {"type": "array", "items": {"type": "integer"}},
                "first_offset": {"type": "integer"},
                "last_offset": {"type": "integer"},
                "original_topics": _STRINGS,
                "error_classes": _STRINGS,
                "error_pattern": {"type": "string"},
                "keys": _STRINGS,
                "headers": _HEADER_PAIRS,
            },
            optional=[
                "since",
                "until",
                "partitions",
                "first_offset",
                "last_offset",
                "original_topics",
                "error_classes",
                "error_pattern",
                "keys",
                "headers",
            ],
        ),
        "description": "The criteria given (an empty object selects every record).",
    },
    "ErrorGroup": _object(
        {
            "original_topic": _nullable("string"),
            "error_class": _nullable("string"),
            "records": {"type": "integer"},
            "oldest_failure": _nullable("integer"),
            "newest_failure": _nullable("integer"),
        }
    ),
    "PartitionStats": _object(
        {
            "topic": {"type": "string"},
            "partition": {"type": "integer"},
            "low": {"type": "integer"},
            "high": {"type": "integer"},
            "records": {"type": "integer"},
            "committed": _nullable("integer"),
            "lag": _nullable("integer"),
        }
    ),
    "Stats": {
        **_object(
            {
                "topics": _STRINGS,
                "records": {"type": "integer"},
                "undecodable": {"type": "integer", "description": "Records without a readable original topic."},
                "by_original_topic": _counts(),
                "by_error_class": _counts(),
                "by_reason": _counts(),
                "by_format": _counts(),
                "groups": {"type": "array", "items": _ref("ErrorGroup")},
                "oldest_failure": _nullable("integer"),
                "newest_failure": _nullable("integer"),
                "oldest_failure_at": _nullable("string"),
                "newest_failure_at": _nullable("string"),
                "partitions": {"type": "array", "items": _ref("PartitionStats")},
                "group": _nullable("string"),
                "lag": _nullable("integer"),
                "seconds": {"type": "number"},
            }
        ),
        "description": "What the topics hold. Times are epoch milliseconds (the *_at ones ISO-8601).",
    },
    "Record": {
        **_object(
            {
                "dlq": {"type": "string", "description": "topic/partition/offset in the DLQ."},
                "partition": {"type": "integer"},
                "offset": {"type": "integer"},
                "timestamp": _nullable("string"),
                "format": _nullable("string"),
                "undecodable": _nullable("string"),
                "original": _object(
                    {
                        "topic": _nullable("string"),
                        "partition": _nullable("integer"),
                        "offset": _nullable("integer"),
                        "timestamp": _nullable("string"),
                    }
                ),
                "error": _object({"class": _nullable("string"), "message": _nullable("string")}),
                "attempts": {"type": "integer"},
                "first_failure": _nullable("string"),
                "last_failure": _nullable("string"),
                "group": _nullable("string"),
                "reason": _nullable("string"),
                "redrive_count": {"type": "integer"},
                "key": _nullable("string"),
                "value": {"description": "The JSON value when the value is JSON, else escaped text."},
                "value_format": {"type": "string", "enum": ["json", "text", "null"]},
                "value_bytes": _nullable("integer"),
                "headers": _HEADER_PAIRS,
                "destination": {"type": "string", "description": "Dry-run samples: where it would go."},
            },
            # A decoded record has its metadata; an undecodable one says why instead.
            optional=[
                "undecodable",
                "original",
                "error",
                "attempts",
                "first_failure",
                "last_failure",
                "group",
                "reason",
                "redrive_count",
                "destination",
            ],
        ),
        "description": "A dead letter, decoded: the original key, value and headers, and the failure.",
    },
    "Peek": _object(
        {
            "topic": {"type": "string"},
            "filter": _ref("Filter"),
            "scanned": {"type": "integer", "description": "Records read to find the matching ones."},
            "matched": {"type": "integer"},
            "records": {"type": "array", "items": _ref("Record")},
        }
    ),
    "RunReport": {
        **_object(
            {
                "action": {"type": "string", "enum": ["redrive"]},
                "topic": {"type": "string"},
                "group": {"type": "string", "description": "The run's consumer group (reruns resume from it)."},
                "guarantee": {"type": "string", "enum": ["exactly-once", "at-least-once"]},
                "dry_run": {"type": "boolean"},
                "filter": _ref("Filter"),
                "max_redrives": _nullable("integer"),
                "rate_limit": _nullable("number"),
                "total": {"type": "integer"},
                "read": {"type": "integer"},
                "selected": {"type": "integer"},
                "skipped": {"type": "integer"},
                "sent": {**_counts(), "description": "Per destination topic: sent (a dry run: would be sent)."},
                "refused": {**_counts(), "description": "Per kind: loop_guard, undecodable."},
                "refusals": {
                    "type": "array",
                    "items": _object(
                        {"dlq": {"type": "string"}, "kind": {"type": "string"}, "detail": {"type": "string"}}
                    ),
                },
                "samples": {"type": "array", "items": _ref("Record"), "description": "Dry runs only."},
                "transactions": {"type": "integer"},
                "aborted_transactions": {"type": "integer"},
                "seconds": {"type": "number"},
                "records_per_second": {"type": "number"},
            },
            optional=["samples"],
        ),
        "description": "What a redrive did (a dry run: would do).",
    },
}


def _body_schema(params: Sequence[Param]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {param.name: {**param.schema(), "description": param.description} for param in params},
        "required": [param.name for param in params if param.required],
        "additionalProperties": False,
    }


def _query(params: Sequence[Param]) -> list[dict[str, Any]]:
    return [
        {
            "name": param.name,
            "in": "query",
            "required": param.required,
            "description": param.description,
            "schema": param.schema(),
            **({"style": "form", "explode": True} if param.many else {}),
        }
        for param in params
    ]


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _error(description: str, *headers: str) -> dict[str, Any]:
    response = _json(description, "Error")
    if headers:
        response["headers"] = {name: {"required": True, "schema": {"type": "string"}} for name in headers}
    return response


def _api_errors(*, secured: bool) -> dict[str, Any]:
    errors = {
        "404": _error("A topic does not exist."),
        "422": _error("A parameter breaks a rule: the message says which, and what it accepts."),
        "429": _error(f"{MAX_READS} reading calls are running already.", "Retry-After"),
        "502": _error("Kafka failed."),
        "503": _error("Kafka cannot be reached."),
    }
    if secured:
        errors["401"] = _error("The token is missing or wrong: nothing was done.", "WWW-Authenticate")
    return errors


def openapi_document(*, handler: bool, secured: bool, version: str = "0.1.0") -> dict[str, Any]:
    """The document for an app with (``handler``) or without a handler, and with (``secured``) or without a token."""
    security: list[dict[str, list[str]]] = [{"bearer": []}] if secured else []
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Alive: the handler's tasks run (always ok without a handler).",
                "responses": {
                    "200": _json("Healthy.", "Health"),
                    "503": _json("A task of the handler has failed.", "Health"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {"description": "OpenAPI 3.1.", "content": {_JSON: {"schema": {"type": "object"}}}}
                },
            }
        },
        "/api/stats": {
            "get": {
                "operationId": "stats",
                "summary": "Count what DLQ topics hold: by original topic, error class, reason and format; lag.",
                "description": "Reads the topics to their current end with no consumer group; commits nothing.",
                "parameters": _query(STATS),
                "security": security,
                "responses": {"200": _json("The counts.", "Stats"), **_api_errors(secured=secured)},
            }
        },
        "/api/peek": {
            "get": {
                "operationId": "peek",
                "summary": "The first dead letters the filter selects, decoded.",
                "description": "Reads (read_committed) from the start, or the filter's first offset or time.",
                "parameters": _query(PEEK),
                "security": security,
                "responses": {"200": _json("The records.", "Peek"), **_api_errors(secured=secured)},
            }
        },
        "/api/redrive": {
            "post": {
                "operationId": "redrive",
                "summary": "Send dead letters back to their original topics (or `to`); a dry run by default.",
                "description": (
                    "A dry run counts what a run would send where, with samples, and commits nothing. A real run "
                    "(dry_run: false) needs a configured token; it sends exactly once, at `rate` records per second "
                    "at most (1000 unless given), and the same call again continues where a stopped one ended."
                ),
                "security": security,
                "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("RedriveRequest")}}},
                "responses": {
                    "200": _json("What the run did (or would do).", "RunReport"),
                    "400": _error("The body is not JSON."),
                    **({} if secured else {"403": _error("Real redrives are off: no token is configured.")}),
                    "409": _error("A real redrive is running already.", "Retry-After"),
                    "413": _error(f"The body is larger than {MAX_BODY_BYTES} bytes."),
                    "415": _error("The body is not application/json."),
                    **_api_errors(secured=secured),
                },
            }
        },
    }
    if handler:
        paths["/readyz"] = {
            "get": {
                "operationId": "readyz",
                "summary": "Ready: the handler consumes and Redis answers.",
                "responses": {"200": _json("Ready.", "Ready"), "503": _json("Not ready, and why.", "Ready")},
            }
        }
        paths["/metrics"] = {
            "get": {
                "operationId": "metrics",
                "summary": "The handler's Prometheus metrics.",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        }
    components: dict[str, Any] = {"schemas": {**_SCHEMAS, "RedriveRequest": _body_schema(REDRIVE)}}
    if secured:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The configured http_token."}
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kafka-dlq ops API",
            "version": version,
            "description": (
                "Look at dead-letter topics and redrive them. With a token configured, every /api call needs "
                "`Authorization: Bearer <token>`; without one, the reading calls are open and real redrives are off."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": components,
    }
