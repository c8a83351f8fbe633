"""The ops API's request parameters, declared once: read from a query string or a JSON body, and described in the
OpenAPI document from the same declaration, so what is documented is what is checked.

Pure: a :class:`Param` turns raw input into a value or raises :class:`ApiError` (status 422) naming the parameter
and what it accepts; :func:`parse_query` and :func:`parse_body` do that for a whole request.

>>> limit = Param(name="limit", kind=Kind.INTEGER, description="Records, at most.", minimum=1, maximum=1000, default=20)
>>> parse_query({"limit": ["5"]}.items(), [limit])
{'limit': 5}
>>> parse_body({}, [limit])
{'limit': 20}
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["ApiError", "Kind", "Param", "parse_body", "parse_query"]


class ApiError(Exception):
    """A request the API answers with ``status`` and a JSON ``{"error": message}`` (plus ``field`` when known)."""

    def __init__(
        self, status: int, message: str, *, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message} if self.field is None else {"error": self.message, "field": self.field}


class Kind(StrEnum):
    """A parameter's JSON Schema type."""

    STRING = "string"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"


# Query strings carry text: only these spellings are numbers or booleans (int() and float() would also take
# " 7", "1_000", "nan" and non-ASCII digits, which the OpenAPI document does not allow).
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_NUMBER = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?")
_BOOLEAN = {"true": True, "false": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    """One parameter: its name, JSON type and limits; ``many`` makes it a list (a repeated query parameter)."""

    name: str
    kind: Kind
    description: str
    many: bool = False
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    """An exclusive minimum."""
    max_length: int | None = None
    pattern: str | None = None
    """A regular expression the whole text must match, written so that Python and ECMA-262 read it alike."""
    rule: str | None = None
    """The pattern in words, for error messages."""
    choices: tuple[str, ...] = ()
    min_items: int | None = None
    max_items: int | None = None

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the parameter's value (a list's, when ``many``)."""
        item: dict[str, Any] = {"type": self.kind.value}
        if self.choices:
            item["enum"] = list(self.choices)
        if self.minimum is not None:
            item["minimum"] = self.minimum
        if self.maximum is not None:
            item["maximum"] = self.maximum
        if self.above is not None:
            item["exclusiveMinimum"] = self.above
        if self.max_length is not None:
            item["maxLength"] = self.max_length
        if self.pattern is not None:
            # JSON Schema patterns are searched, not matched: anchored here (no multiline flag, so "$" is the end).
            item["pattern"] = f"^(?:{self.pattern})$"
        if not self.many:
            if self.default is not None:
                item["default"] = self.default
            return item
        array: dict[str, Any] = {"type": "array", "items": item}
        if self.min_items is not None:
            array["minItems"] = self.min_items
        if self.max_items is not None:
            array["maxItems"] = self.max_items
        return array

    def _fail(self, what: str) -> ApiError:
        return ApiError(422, f"{self.name!r} {what}", field=self.name)

    def _accepts(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        text = {Kind.STRING: "text", Kind.INTEGER: "a whole number", Kind.NUMBER: "a number"}.get(self.kind, "")
        if self.kind is Kind.BOOLEAN:
            return "true or false"
        bounds = []
        if self.minimum is not None:
            bounds.append(f"at least {self.minimum:g}")
        if self.above is not None:
            bounds.append(f"above {self.above:g}")
        if self.maximum is not None:
            bounds.append(f"at most {self.maximum:g}")
        return text + (f" ({', '.join(bounds)})" if bounds else "")

    def _check(self, value: Any) -> Any:
        """The limits of one value already of the right type."""
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in JSON): no UTF-8 text, no Kafka bytes
                raise self._fail("is not valid Unicode text (it holds a lone surrogate)") from None
            if self.max_length is not None and len(value) > self.max_length:
                raise self._fail(f"is longer than {self.max_length} characters")
            if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
                raise self._fail(
                    f"{value[:80]!r} is not valid: it must be {self.rule or 'text matching ' + self.pattern}"
                )
            if self.choices and value not in self.choices:
                raise self._fail(f"must be {self._accepts()}, not {value[:80]!r}")
            return value
        if isinstance(value, bool):
            return value
        if (
            (self.minimum is not None and value < self.minimum)
            or (self.maximum is not None and value > self.maximum)
            or (self.above is not None and value <= self.above)
        ):
            raise self._fail(f"must be {self._accepts()}, not {value}")
        return value

    def from_text(self, text: str) -> Any:
        """One value from a query string."""
        value: Any
        if self.kind is Kind.STRING:
            value = text
        elif self.kind is Kind.BOOLEAN:
            if text not in _BOOLEAN:
                raise self._fail(f"must be true or false, not {text[:80]!r}")
            value = _BOOLEAN[text]
        elif self.kind is Kind.INTEGER:
            if _INTEGER.fullmatch(text) is None:
                raise self._fail(f"must be {self._accepts()}, not {text[:80]!r}")
            value = int(text)
        else:
            if _NUMBER.fullmatch(text) is None:
                raise self._fail(f"must be {self._accepts()}, not {text[:80]!r}")
            value = float(text)
        return self._check(value)

    def from_json(self, data: Any) -> Any:
        """One value from a JSON body: of the parameter's JSON type (a list of them, when ``many``)."""
        if not self.many:
            return self._one(data)
        if not isinstance(data, list):
            raise self._fail(f"must be a list of {self._accepts()}")
        self._count(len(data))
        return [self._one(item) for item in data]

    def _count(self, count: int) -> None:
        if self.min_items is not None and count < self.min_items:
            raise self._fail(f"needs at least {self.min_items} value(s)")
        if self.max_items is not None and count > self.max_items:
            raise self._fail(f"takes at most {self.max_items} values")

    def _one(self, data: Any) -> Any:
        kind = self.kind
        if kind is Kind.STRING and isinstance(data, str):
            return self._check(data)
        if kind is Kind.BOOLEAN and isinstance(data, bool):
            return data
        if isinstance(data, bool):  # JSON true is not the number 1
            raise self._fail(f"must be {self._accepts()}, not {str(data).lower()}")
        if kind is Kind.INTEGER and isinstance(data, float) and data.is_integer():
            data = int(data)  # JSON Schema: 5.0 is an integer
        if (kind is Kind.INTEGER and isinstance(data, int)) or (
            kind is Kind.NUMBER and isinstance(data, int | float) and math.isfinite(data)
        ):
            return self._check(data)
        raise self._fail(f"must be {self._accepts()}, not {_json_type(data)}")


def _json_type(data: Any) -> str:
    if data is None:
        return "null"
    return {str: "text", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(data), type(data).__name__
    )


def parse_query(items: Iterable[tuple[str, str]], params: Sequence[Param]) -> dict[str, Any]:
    """The parameters of a query string (its ``(name, value)`` pairs): each converted, checked and defaulted.

    A name the operation does not know, a single-valued one given twice and a missing required one are errors.
    """
    known = {param.name: param for param in params}
    given: dict[str, list[str]] = {}
    for name, value in items:
        if name not in known:
            raise ApiError(422, f"unknown query parameter {name[:80]!r}: use {_names(params)}", field=name)
        given.setdefault(name, []).append(value)
    out: dict[str, Any] = {}
    for param in params:
        values = given.get(param.name)
        if values is None:
            _default(param, out)
        elif param.many:
            param._count(len(values))
            out[param.name] = [param.from_text(value) for value in values]
        elif len(values) > 1:
            raise param._fail("is given more than once: give it once")
        else:
            out[param.name] = param.from_text(values[0])
    return out


def parse_body(data: Any, params: Sequence[Param]) -> dict[str, Any]:
    """The fields of a JSON body, which must be an object holding only known fields (``null`` is no value)."""
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object with {_names(params)}, not {_json_type(data)}")
    known = {param.name for param in params}
    for name in data:
        if name not in known:
            raise ApiError(422, f"unknown field {name[:80]!r}: use {_names(params)}", field=name)
    out: dict[str, Any] = {}
    for param in params:
        if param.name in data:
            out[param.name] = param.from_json(data[param.name])
        else:
            _default(param, out)
    return out


def _default(param: Param, out: dict[str, Any]) -> None:
    if param.required:
        raise param._fail("is required")
    out[param.name] = [] if param.many else param.default


def _names(params: Sequence[Param]) -> str:
    return ", ".join(param.name for param in params)
