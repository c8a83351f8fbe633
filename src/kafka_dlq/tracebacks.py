"""Stack traces for dead letters, formatted cheaply enough to run on the event loop for every failed attempt.

``traceback.format_exception`` costs ~0.1-0.3 ms a call on Python 3.11: it finds each frame's column positions
(walking the code's position table up to the frame's instruction) and parses the source line with ``ast`` to draw
the ``^^^^`` carets, and it ``stat``s every source file (``linecache.checkcache``), which is file I/O on the loop.
A dead letter's ``dlq.error.stacktrace`` needs none of that: :func:`format_traceback` writes the same text as
``format_exception`` without the carets, in a few microseconds, with source lines taken only from ``linecache``'s
memory (a file not read yet is read off the loop, by ``warm``, for the next failure).

>>> try:
...     {}["missing"]
... except KeyError as exc:
...     print(format_traceback(exc).splitlines()[-1])
KeyError: 'missing'
"""

from __future__ import annotations

import asyncio
import linecache
import traceback
from collections.abc import Callable

__all__ = ["SourceReader", "format_traceback"]

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"
_MAX_CHAIN = 16
"""Chained exceptions written at most (a chain is finite, but a cycle through __context__ is possible)."""


def format_traceback(exc: BaseException, limit: int | None = None, warm: Callable[[str], None] | None = None) -> str:
    """``"".join(traceback.format_exception(exc))``, without the carets, and cut once it is ``limit`` characters
    long at least (frames past that point are not formatted at all; cap the result to the exact size you need).

    ``warm(filename)`` is called once for each source file whose lines are not in ``linecache`` yet (its frames show no
    source line this time): run ``linecache.getlines(filename)`` off the loop there. Exception groups go through
    ``traceback.format_exception`` itself: their nested layout is its own.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "".join(traceback.format_exception(exc))
    chain: list[tuple[BaseException, str]] = []  # newest first, each with the text that leads to the newer one
    seen: set[int] = set()
    current: BaseException | None = exc
    lead = ""
    while current is not None and id(current) not in seen and len(chain) < _MAX_CHAIN:
        seen.add(id(current))
        chain.append((current, lead))
        if current.__cause__ is not None:
            current, lead = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, lead = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    size = 0
    cache = linecache.cache
    unread: set[str] = set()
    for error, lead in reversed(chain):  # the oldest first, as Python prints them
        tb = error.__traceback__
        if tb is not None:
            parts.append("Traceback (most recent call last):\n")
        while tb is not None and (limit is None or size < limit):
            code = tb.tb_frame.f_code
            filename, lineno = code.co_filename, tb.tb_lineno
            frame = f'  File "{filename}", line {lineno}, in {code.co_name}\n'
            entry = cache.get(filename)
            if entry is None or len(entry) != 4:  # not read yet (or only known to a loader: reading is I/O)
                if warm is not None and not filename.startswith("<") and filename not in unread:
                    unread.add(filename)
                    warm(filename)
            elif lineno is not None and 0 < lineno <= len(lines := entry[2]) and (source := lines[lineno - 1].strip()):
                frame += f"    {source}\n"
            parts.append(frame)
            size += len(frame)
            tb = tb.tb_next
        parts.append(_last_line(error))
        if limit is not None and size >= limit:
            break
        parts.append(lead)
    return "".join(parts)


def _last_line(error: BaseException) -> str:
    """``traceback.format_exception_only(error)`` in the common case (no notes, not a SyntaxError), without the
    ``TracebackException`` it builds for it."""
    if isinstance(error, SyntaxError) or getattr(error, "__notes__", None) is not None:
        return "".join(traceback.format_exception_only(type(error), error))
    cls = type(error)
    name = cls.__qualname__
    if cls.__module__ not in ("__main__", "builtins"):
        name = f"{cls.__module__}.{name}"
    try:
        text = str(error)
    except Exception:
        text = "<exception str() failed>"
    return f"{name}: {text}\n" if text else f"{name}\n"


class SourceReader:
    """A ``warm`` for :func:`format_traceback`, called on the loop: reads a source file into ``linecache`` in the
    loop's default executor, each file once at a time, so that the stack traces of later failures show its lines."""

    def __init__(self) -> None:
        self._reading: set[str] = set()

    def __call__(self, filename: str) -> None:
        if filename in self._reading:
            return
        try:
            reading = asyncio.get_running_loop().run_in_executor(None, linecache.getlines, filename)
        except RuntimeError:  # the loop is closing: this failure's trace goes without those lines, no more
            return
        self._reading.add(filename)
        reading.add_done_callback(lambda _: self._reading.discard(filename))
