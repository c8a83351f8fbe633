"""Stack traces for dead letters: what Python prints, without the carets, and without file I/O."""

from __future__ import annotations

import linecache
import traceback

import pytest

from kafka_dlq.tracebacks import format_traceback


def _without_carets(text: str) -> str:
    return "\n".join(line for line in text.split("\n") if not line.strip() or set(line.strip()) - set("^~"))


def _raised(fn):
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


def _plain():
    {}["missing"]


def _caused():
    try:
        _plain()
    except KeyError as exc:
        raise ValueError("wrapped") from exc


def _during():
    try:
        _caused()
    except ValueError:
        raise ConnectionError("while handling")  # noqa: B904  (the context chain is what is tested)


def _suppressed():
    try:
        _plain()
    except KeyError:
        raise RuntimeError("no context shown") from None


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


def _bad_str():
    raise _BadStr()


def _noted():
    error = TimeoutError("slow")
    error.add_note("after 3 tries")
    raise error


def _empty_message():
    raise ConnectionError()


@pytest.mark.parametrize("fn", [_plain, _caused, _during, _suppressed, _bad_str, _noted, _empty_message])
def test_a_traceback_reads_as_python_prints_it_less_the_carets(fn):
    exc = _raised(fn)
    linecache.getlines(__file__)  # as the handler's warm-up leaves it after the first failure

    assert format_traceback(exc) == _without_carets("".join(traceback.format_exception(exc)))


def test_an_exception_without_a_traceback_is_its_last_line():
    assert format_traceback(KeyError("k")) == "KeyError: 'k'\n"


def test_an_exception_group_is_formatted_by_python_itself():
    group = _raised(lambda: (_ for _ in ()).throw(ExceptionGroup("two", [KeyError("a"), ValueError("b")])))
    assert format_traceback(group) == "".join(traceback.format_exception(group))


def test_source_lines_come_only_from_memory_and_a_file_not_read_yet_is_handed_to_warm():
    exc = _raised(_plain)
    linecache.cache.pop(__file__, None)
    asked: list[str] = []

    text = format_traceback(exc, warm=asked.append)

    assert asked == [__file__]
    assert '{}["missing"]' not in text  # no source line this time: reading it is file I/O
    assert f'File "{__file__}"' in text and text.endswith("KeyError: 'missing'\n")
    linecache.getlines(__file__)  # what warm does, off the loop
    assert '{}["missing"]' in format_traceback(exc, warm=asked.append)
    assert asked == [__file__]


def test_a_deep_traceback_stops_once_it_is_past_the_limit():
    def recurse(n: int) -> None:
        if n == 0:
            raise RecursionError("deep")
        recurse(n - 1)

    exc = _raised(lambda: recurse(300))

    full, cut = format_traceback(exc), format_traceback(exc, limit=2000)

    assert 2000 <= len(cut) < len(full)
    assert cut.endswith("RecursionError: deep\n")  # the error itself is always said
    assert full.startswith(cut[:2000])
