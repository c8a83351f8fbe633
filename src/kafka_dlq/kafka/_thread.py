"""One thread per librdkafka client: the only thread that calls it.

The event loop hands work to the thread as commands (functions of the client) and gets results back through
``loop.call_soon_threadsafe``; between commands the thread serves the client (``consume`` or ``poll`` with a short
timeout), so callbacks always run there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any, Generic, TypeVar

from confluent_kafka import KafkaError, KafkaException

from kafka_dlq.errors import (
    BrokerUnreachableError,
    ClientClosedError,
    ConfigError,
    DeliveryError,
    KafkaClientError,
    RecordTooLargeError,
    TopicNotFoundError,
)

__all__ = ["ClientState", "ClientThread", "QuietErrors", "translate"]

log = logging.getLogger("kafka_dlq.kafka")
librdkafka_log = logging.getLogger("kafka_dlq.librdkafka")
"""librdkafka's own log lines, through Python logging instead of straight to stderr."""


class QuietErrors:
    """Logs a client's non-fatal errors, each distinct text at most once per ``every`` seconds.

    While a broker restarts, librdkafka reports the same refused connection many times a second; one line says it.
    """

    def __init__(self, name: str, every: float = 10.0) -> None:
        self.name = name
        self.every = every
        self._last: dict[str, float] = {}

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(text, -self.every) >= self.every:
            self._last[text] = now
            log.warning("%s: %s", self.name, text)


C = TypeVar("C")
R = TypeVar("R")


class ClientState(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


_TOO_LARGE = {KafkaError.MSG_SIZE_TOO_LARGE}
_UNKNOWN_TOPIC = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}
_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._RESOLVE}


def translate(error: KafkaError | BaseException, context: str) -> KafkaClientError | ConfigError:
    """Map a librdkafka error to the project's own, keeping whether it is retriable or fatal."""
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError):
        error = error.args[0]
    if not isinstance(error, KafkaError):
        return KafkaClientError(f"{context}: {error}")
    code, text = error.code(), error.str()
    kwargs: dict[str, Any] = {"code": error.name(), "retriable": bool(error.retriable()), "fatal": bool(error.fatal())}
    if code == KafkaError._INVALID_ARG and "configuration property" in text:
        return ConfigError(
            f"{context}: {text}: check the setting's name and value against librdkafka's CONFIGURATION.md"
        )
    if code in _TOO_LARGE:
        return RecordTooLargeError(
            f"{context}: record too large ({text}): raise the topic's max.message.bytes and the producer's "
            "message.max.bytes, or make the record smaller",
            **kwargs,
        )
    if code in _UNKNOWN_TOPIC:
        return TopicNotFoundError(f"{context}: {text}: create the topic or fix its name", **kwargs)
    if code in _UNREACHABLE:
        return BrokerUnreachableError(
            f"{context}: {text}: check bootstrap.servers and that the brokers are up", **kwargs
        )
    return DeliveryError(f"{context}: {text}", **kwargs)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ClientThread(threading.Thread, Generic[C]):
    """Owns a client made by ``create`` (called on this thread); ``serve(client)`` runs between commands."""

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        create: Callable[[], C],
        serve: Callable[[C], None],
        close: Callable[[C], None],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.loop = loop
        self._create = create
        self._serve = serve
        self._close = close
        self._commands: queue.SimpleQueue[tuple[Callable[[C], Any], asyncio.Future[Any]]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a command or a stop request came: see idle()
        self.started: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()

    def post(self, future: asyncio.Future[R], result: R | None = None, error: BaseException | None = None) -> None:
        """Resolve ``future`` on the loop (from this thread)."""
        self.call_on_loop(_resolve, future, result, error)

    def call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(fn, *args)

    def call(self, command: Callable[[C], R]) -> asyncio.Future[R]:
        """Run ``command(client)`` on this thread; the returned future resolves on the loop."""
        if self._stopping.is_set() or not self.is_alive():
            raise ClientClosedError("the Kafka client is stopped; create a new one")
        future: asyncio.Future[R] = self.loop.create_future()
        self._commands.put((command, future))
        self.wake()
        return future

    def wake(self) -> None:
        """End this thread's ``idle`` now (from any thread): it has something to do."""
        self._wake.set()

    def idle(self, timeout: float) -> None:
        """Wait (on this thread) up to ``timeout`` seconds, or until a command or a stop request comes."""
        self._wake.wait(timeout)
        self._wake.clear()  # a command posted since is run next anyway: run() runs commands after every serve

    def _run_commands(self, client: C) -> None:
        while True:
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = command(client)
            except BaseException as exc:  # handed to whoever awaits the command
                self.post(future, error=exc)
            else:
                self.post(future, result)

    def request_stop(self) -> None:
        self._stopping.set()
        self.wake()

    def run(self) -> None:
        try:
            client = self._create()
        except BaseException as exc:
            self.post(self.started, error=exc)
            self.post(self.finished)
            return
        self.post(self.started)
        error: BaseException | None = None
        try:
            while not self._stopping.is_set():
                self._run_commands(client)
                self._serve(client)
            self._run_commands(client)
        except BaseException as exc:  # a bug or a fatal client error: say so on the loop, do not die silently
            log.exception("%s: the client thread failed", self.name)
            error = exc
        finally:
            try:
                self._close(client)
            except BaseException as exc:
                log.warning("%s: closing the client failed: %s", self.name, exc)
            self._fail_pending()
            self.post(self.finished, error=error)

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            self.post(future, error=ClientClosedError("the Kafka client stopped before this command ran"))
