"""asyncio producers over confluent-kafka: awaitable deliveries, idempotent, ``acks=all``; transactions too.

``produce`` is called from the loop (librdkafka only queues the record); a dedicated thread polls for delivery
reports and resolves their futures on the loop in batches, and runs every call that waits (flush, transactions,
metadata) so that none runs on the loop. While records are in flight, the loop serves their delivery reports
itself with ``poll(0)``, which never waits (between sends, and every 2 ms until acknowledgements stop coming):
see ``AsyncProducer._serve`` for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from kafka_dlq.errors import ClientClosedError, ConfigError, KafkaClientError, TopicNotFoundError
from kafka_dlq.kafka._thread import ClientState, ClientThread, QuietErrors, librdkafka_log, translate
from kafka_dlq.kafka.record import Headers

R = TypeVar("R")

__all__ = ["AsyncProducer", "Delivery", "TransactionalProducer"]

log = logging.getLogger("kafka_dlq.kafka.producer")

_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    # One produce response's delivery reports are served in one go, by whichever poll() comes next: on the loop,
    # that is one slice of the loop's time (a few microseconds a record). librdkafka's defaults (1 MB, 10,000
    # records a batch) let one slice take 20-30 ms under load; a quarter of that bounds it near 1 ms and costs
    # no throughput measurable here (`kafka-dlq bench client`).
    "batch.size": 262_144,
    "batch.num.messages": 1000,
    # At most 1,000 records queued or in flight (librdkafka: 100,000). The loop serves delivery reports itself, and
    # one poll(0) serves every report that has arrived, about 2 us each: after the loop was off the CPU for a
    # moment, or the broker paused and then acknowledged everything at once, that is all the records in flight,
    # in one slice of the loop's time. A thousand bound it near 2 ms. A send that finds the queue full awaits room.
    # Measured (`kafka-dlq bench client`, 6 alternating runs each): loop-lag p99 median 8.9 ms with 5,000, 6.5 ms
    # with 1,000 (produce case 7.5-14 -> 2.1-5.2 ms), at the same rates (produce 104-150k vs 92-143k rec/s); 500
    # halves the produce rate. The bound caps a producer at 1,000 records per acknowledgement round trip: one far
    # from its brokers (tens of ms away) that must send faster than that raises it.
    "queue.buffering.max.messages": 1000,
}
_YIELD_EVERY = 50
"""Sends in a row before ``send`` serves delivery reports and lets the loop run other tasks."""
_TICK = 0.002
"""Seconds between the loop's own polls for delivery reports while records are in flight and it sends none."""
_QUIET_TICKS = 25
"""Ticks in a row that serve no report, with no send either, before the loop leaves the reports to the thread.

Acknowledgements come within milliseconds, or not for a long while (a broker that is down, paused, far away): the
thread then waits for them in poll(), which sleeps, instead of the loop waking 500 times a second to find none."""
_LOOP_SERVES_FOR = 0.05
"""Seconds after the loop last served delivery reports during which the thread leaves them to it."""
_THREAD_POLL = 0.02
"""The longest the thread's own poll may wait: the loop may take over again that much later."""
_RESOLVE_CHUNK = 250
"""Delivery futures resolved in one loop callback; more wait for the next, so other tasks run in between."""
_Future = asyncio.Future
_PARTITION_ANY = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses


class Delivery(NamedTuple):
    """Where the broker wrote a record."""

    topic: str
    partition: int
    offset: int


_Outcome = tuple["asyncio.Future[Delivery]", KafkaError | None, str, int, int]


class AsyncProducer:
    """Produce from the event loop; ``await`` the delivery when you need it durable.

    >>> async with AsyncProducer({"bootstrap.servers": b}) as producer:   # doctest: +SKIP
    ...     delivery = await producer.produce("orders", b"value", key=b"k", headers=[("h", b"1")])
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        name: str = "producer",
        poll_timeout: float = 0.05,
        connect_timeout: float = 15.0,
    ) -> None:
        if "bootstrap.servers" not in config:
            raise ConfigError("producer setting 'bootstrap.servers' is missing: name the brokers")
        if "on_delivery" in config or "error_cb" in config:
            raise ConfigError("producer settings 'on_delivery' and 'error_cb' are managed by kafka-dlq: remove them")
        weaker = _weaker_durability(config)
        if weaker:
            raise ConfigError(
                f"producer setting {weaker} would let a record be acknowledged before it is safe: kafka-dlq always "
                "produces with acks=all and enable.idempotence=true; remove the setting"
            )
        self._config = {**_DEFAULTS, **config}
        self.name = name
        self._poll_timeout = poll_timeout
        self._connect_timeout = connect_timeout
        self.state = ClientState.NEW
        self._thread: ClientThread[Producer] | None = None
        self._producer: Producer | None = None
        self._loop_thread: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._completed: list[_Outcome] = []  # delivery reports served on the thread, for the loop to resolve
        self._to_resolve: deque[_Outcome] = deque()  # on the loop: handed over by the thread, not yet resolved
        self._resolve_scheduled = False
        self._loop_served_at = 0.0
        self._ticking = False  # the loop's next poll for delivery reports is scheduled
        self._quiet_ticks = 0  # ticks in a row that served no delivery report, with no send in between
        self._thread_serves = False  # the thread runs a call that serves delivery reports itself (flush, commit)
        self._room = asyncio.Event()
        self._known_topics: set[str] = set()
        self._fatal: KafkaClientError | ConfigError | None = None
        self._sent_since_yield = 0
        self._quiet = QuietErrors(name)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the client on its thread and check a broker answers (BrokerUnreachableError if none does)."""
        if self.state is not ClientState.NEW:
            raise ClientClosedError(f"this producer is {self.state.value}; a producer starts once: create a new one")
        self.state = ClientState.STARTING
        self._loop_thread = threading.get_ident()
        self._loop = asyncio.get_running_loop()
        self._thread = ClientThread(
            f"kafka-dlq-{self.name}", asyncio.get_running_loop(), self._create, self._serve, self._close
        )
        self._thread.start()
        try:
            await self._thread.started
            # produce() is called from the loop (it only queues); everything that waits stays on the thread.
            producer = await self._thread.call(lambda producer: producer)
            await self._after_start()
        except BaseException:
            self.state = ClientState.CLOSED
            self._thread.request_stop()
            await asyncio.shield(self._thread.finished)
            raise
        self.state = ClientState.RUNNING
        self._producer = producer  # set while RUNNING only: send() checks this one attribute
        self._thread.finished.add_done_callback(self._thread_finished)

    def _thread_finished(self, finished: asyncio.Future[None]) -> None:
        """The producer's thread ended on its own (a fatal error, a bug): closed, and every later send says so."""
        if self.state in (ClientState.STOPPING, ClientState.CLOSED):
            return
        error = None if finished.cancelled() else finished.exception()
        self.state = ClientState.CLOSED
        self._producer = None
        if self._fatal is None:
            self._fatal = (
                error
                if isinstance(error, KafkaClientError | ConfigError)
                else KafkaClientError(
                    f"{self.name}: its thread stopped unexpectedly ({error!r}); create a new producer", fatal=True
                )
            )
        self._resolve(everything=True)

    async def _after_start(self) -> None:
        """Extra start-up work on the thread (transactions)."""

    async def stop(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then close; never on the loop."""
        if self.state in (ClientState.NEW, ClientState.CLOSED):
            self.state = ClientState.CLOSED
            return
        self.state = ClientState.STOPPING
        self._producer = None
        thread = self._thread
        assert thread is not None
        try:
            remaining = await thread.call(lambda producer: producer.flush(timeout))
            if remaining:
                log.error("%s: %d records were not delivered within %.0f s of stopping", self.name, remaining, timeout)
        except ClientClosedError:
            pass
        thread.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(thread.finished), timeout)
        except TimeoutError:
            log.error("%s did not close within %.0f s; leaving its thread behind", self.name, timeout)
        except Exception as exc:  # the thread ended with an error (fatal, or a bug): stopping still completes
            log.warning("%s closed with an error: %s", self.name, exc)
        finally:
            self.state = ClientState.CLOSED
            self._resolve(everything=True)  # every future is settled (delivered or failed) once stopped

    async def __aenter__(self) -> AsyncProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- producing (loop)

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> asyncio.Future[Delivery]:
        """Queue a record; returns its delivery future. Waits (without blocking) while the local queue is full."""
        producer = self._producer  # None unless RUNNING
        if producer is None or self._fatal is not None:
            raise self._fatal or ClientClosedError(f"the producer is {self.state.value}")  # a fatal error says why
        if topic not in self._known_topics:
            await self._check_topic(topic)
        # The producer's own loop, not asyncio.get_running_loop(): on Python 3.11 that asks the kernel for the
        # process id on every call (to notice a fork), a system call per record. And the Future class itself:
        # loop.create_future() is one more Python call around it.
        future: asyncio.Future[Delivery] = _Future(loop=self._loop)
        # One small object per record in flight (a partial of a plain function, not of a bound method, which
        # would be a second one): fewer objects for the garbage collector to walk while records are in flight.
        on_delivery = functools.partial(_delivered, self, future)
        # Positional arguments (topic, value, key, partition, callback, on_delivery, timestamp, headers): this runs
        # once per record, and keyword parsing would cost more than librdkafka's own work. 0 is "now".
        listed: Any = None
        if headers:
            listed = headers if type(headers) is list else list(headers)  # confluent-kafka takes a list only
        where = _PARTITION_ANY if partition is None else partition
        while True:
            try:
                producer.produce(topic, value, key, where, on_delivery, None, timestamp or 0, listed)
                self._quiet_ticks = 0
                self._sent_since_yield += 1
                if self._sent_since_yield >= _YIELD_EVERY:
                    # A tight loop of sends never waits; let the loop breathe so it serves everything else too.
                    self._sent_since_yield = 0
                    self._serve_on_loop(producer)
                    await asyncio.sleep(0)
                elif not self._ticking:  # the loop serves this record's report too, within a tick of its arrival
                    self._tick_soon()
                return future
            except BufferError:
                # The local queue is full: wait for delivery reports to make room, never spin or block.
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.5)
                if self._fatal is not None:  # the client died while this send waited for room
                    raise self._fatal from None
                if self.state is not ClientState.RUNNING:
                    raise ClientClosedError(f"the producer is {self.state.value}") from None
            except KafkaException as exc:
                raise translate(exc, f"produce to {topic!r}") from None
            except RuntimeError as exc:  # confluent-kafka's "Producer has been closed": closed under this send
                raise self._fatal or ClientClosedError(f"the producer is closed ({exc})") from None

    async def produce(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | Sequence[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> Delivery:
        """Produce one record and wait for the broker's acknowledgement."""
        future = await self.send(topic, value, key=key, headers=headers, partition=partition, timestamp=timestamp)
        return await future

    async def flush(self, timeout: float = 30.0) -> int:
        """Wait until queued records are delivered; returns how many are still queued after ``timeout``.

        The futures of the delivered records are resolved by the time it returns.
        """

        def flush(producer: Producer) -> int:
            return self._serving(producer.flush, timeout)

        remaining = await self._call(flush)
        self._resolve(everything=True)
        return remaining

    async def _check_topic(self, topic: str) -> None:
        """Fail fast on a topic that does not exist (librdkafka would only time out, much later)."""

        def lookup(producer: Producer) -> Any:
            return producer.list_topics(topic, timeout=self._connect_timeout)

        try:
            metadata = await self._call(lookup)
        except KafkaException as exc:
            raise translate(exc, f"metadata for {topic!r}") from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise TopicNotFoundError(
                f"topic {topic!r} does not exist on {self._config['bootstrap.servers']}: create it or fix its name"
            )
        self._known_topics.add(topic)

    def _call(self, command: Callable[[Producer], R]) -> asyncio.Future[R]:
        if self._thread is None or self.state not in (ClientState.RUNNING, ClientState.STARTING):
            raise ClientClosedError(f"the producer is {self.state.value}")
        return self._thread.call(command)

    # ---------------------------------------------------------------- delivery reports

    def _serve_on_loop(self, producer: Producer) -> bool:
        """Serve delivery reports on the loop, without waiting (``poll(0)``): their futures resolve at once.

        Until every record is reported, the loop polls again every ``_TICK`` seconds, sending or not, and the
        thread stays out of it meanwhile (see ``_serve``); after ``_QUIET_TICKS`` polls in a row that find nothing,
        with nothing sent, it hands them back to the thread (see ``_tick``). True when it served any.
        """
        self._loop_served_at = time.monotonic()
        loop = self._loop
        assert loop is not None
        served = not self._thread_serves and producer.poll(0) > 0  # never both at once: see _serve
        if served:
            self._room.set()
            if not self._resolve_scheduled:
                self._resolve_scheduled = True
                loop.call_soon(self._resolve)
        if not self._ticking:
            self._tick_soon()
        return served

    def _tick_soon(self) -> None:
        self._ticking = True
        assert self._loop is not None
        self._loop.call_later(_TICK, self._tick)

    def _tick(self) -> None:
        self._ticking = False
        producer = self._producer  # None once stopping: the thread serves what is left
        try:
            if producer is None or not len(producer):  # nothing queued, in flight, or reported and not yet served
                return
            if self._quiet_ticks >= _QUIET_TICKS:
                # Nothing reported for a while, and nothing sent: the thread waits for the reports from now on,
                # until the next send. It starts at once, not a _LOOP_SERVES_FOR after this last tick.
                self._loop_served_at = 0.0
                assert self._thread is not None
                self._thread.wake()
                return
            self._quiet_ticks = 0 if self._serve_on_loop(producer) else self._quiet_ticks + 1
        except RuntimeError:  # closed by its thread (a fatal error) just before the loop heard: it served the rest
            pass

    def _serving(self, call: Callable[..., R], *args: Any) -> R:
        """On the thread: ``call`` (flush, a transaction's commit) serves delivery reports; the loop stands aside."""
        self._thread_serves = True
        try:
            return call(*args)
        finally:
            self._thread_serves = False
            self._dispatch()  # queued on the loop before the call's own result

    def _dispatch(self) -> None:
        if self._completed:
            batch, self._completed = self._completed, []
            assert self._thread is not None
            self._thread.call_on_loop(self._handed_over, batch)

    def _handed_over(self, batch: list[_Outcome]) -> None:
        self._to_resolve.extend(batch)
        if not self._resolve_scheduled:
            self._resolve()

    def _resolve(self, *, everything: bool = False) -> None:
        """Resolve the futures of handed-over delivery reports, in order; ``everything`` or a slice at a time.

        Each resolved future may wake a task: a slice per loop callback keeps the loop responsive, the rest follow
        in the next ones. ``flush`` and ``stop`` resolve everything before they return.
        """
        self._resolve_scheduled = False
        pending, make = self._to_resolve, _make_delivery
        for _ in range(len(pending) if everything else min(len(pending), _RESOLVE_CHUNK)):
            future, error, topic, partition, offset = pending.popleft()
            if future.done():
                continue
            if error is None:
                future.set_result(make((topic, partition, offset)))
            else:
                future.set_exception(translate(error, f"delivery to {topic!r}"))
        if pending:
            self._resolve_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._resolve)
        self._room.set()

    # ---------------------------------------------------------------- the producer's thread

    def _create(self) -> Producer:
        config = {"logger": librdkafka_log, **self._config, "error_cb": self._on_client_error}
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise translate(exc, "invalid producer settings") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid producer settings: {exc}") from None
        try:
            producer.list_topics(timeout=self._connect_timeout)
        except KafkaException as exc:
            raise translate(exc, f"producer could not reach {self._config['bootstrap.servers']}") from None
        return producer

    def _serve(self, producer: Producer) -> None:
        # confluent-kafka takes the GIL once per delivery report. While the loop runs Python code (sending),
        # every one of those takes waits for the loop to let go of the GIL, up to the 5 ms switch interval:
        # this thread would crawl and hold the loop back at each turn. And a thread that waits for the GIL is
        # woken in vain each time the loop lets go of it, which the loop's own poll does once per report. So
        # while the loop serves the reports itself (send() does, between records, and its ticks while records
        # are in flight), this thread stays out of the way, waking only for commands; it serves them when the
        # loop has not for a while (nothing in flight, or a loop kept busy by something else).
        assert self._thread is not None
        since = time.monotonic() - self._loop_served_at
        if since < _LOOP_SERVES_FOR:
            self._thread.idle(_LOOP_SERVES_FOR - since)
            return
        producer.poll(min(self._poll_timeout, _THREAD_POLL))
        self._dispatch()

    def _close(self, producer: Producer) -> None:
        # What flush could not deliver in time is purged, so every waiting future fails instead of hanging.
        producer.purge(in_queue=True, in_flight=True, blocking=True)
        producer.poll(0)
        self._dispatch()
        producer.close()

    def _on_client_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = translate(error, f"{self.name} (fatal)")
            log.error("%s: %s", self.name, self._fatal)
        else:
            self._quiet(error.str())


def _delivered(
    producer: AsyncProducer, future: asyncio.Future[Delivery], error: KafkaError | None, msg: Message
) -> None:
    # Inside poll() or flush(), on whichever thread called it. On the loop (poll(0) in send), queue it for the
    # resolver, which runs in slices after this poll: a poll serves every report that has arrived (after a broker
    # pause, thousands), and resolving each future here too would make that one slice twice as long. On the
    # producer's thread, collect: _serve hands the batch to the loop. Nothing here may raise: an exception would
    # surface from poll() in the middle of someone else's send().
    outcome = (future, error, msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
    if threading.get_ident() != producer._loop_thread:
        producer._completed.append(outcome)
    else:
        producer._to_resolve.append(outcome)


def _weaker_durability(config: Mapping[str, Any]) -> str | None:
    """The setting, if any, that weakens ``acks=all`` + idempotence (what every write of kafka-dlq relies on)."""
    acks = config.get("acks", config.get("request.required.acks", "all"))
    if str(acks).strip().lower() not in ("all", "-1"):
        return f"acks={acks!r}"
    idempotence = config.get("enable.idempotence", True)
    if str(idempotence).strip().lower() in ("false", "0"):
        return f"enable.idempotence={idempotence!r}"
    return None


def _make_delivery(where: tuple[str, int, int]) -> Delivery:
    # tuple.__new__ skips the NamedTuple's Python-level __new__: one of these per record delivered.
    return tuple.__new__(Delivery, where)


class TransactionalProducer(AsyncProducer):
    """Consume-transform-produce, exactly once: records and the consumer's offsets commit or abort together.

    >>> async with TransactionalProducer({"bootstrap.servers": b, "transactional.id": "redrive-1"}) as tx:  # +SKIP
    ...     await tx.begin()
    ...     await tx.send("orders", b"v")
    ...     await tx.send_offsets(next_offsets(batch), await consumer.group_metadata())
    ...     await tx.commit()
    """

    def __init__(self, config: Mapping[str, Any], *, transaction_timeout: float = 60.0, **kwargs: Any) -> None:
        if "transactional.id" not in config:
            raise ConfigError("transactional producer setting 'transactional.id' is missing: give a stable id")
        super().__init__(config, **kwargs)
        self._txn_timeout = transaction_timeout

    async def _after_start(self) -> None:
        await self._txn(lambda producer: producer.init_transactions(self._txn_timeout), "init transactions")

    async def begin(self) -> None:
        await self._txn(lambda producer: producer.begin_transaction(), "begin transaction")

    async def send_offsets(self, offsets: Iterable[TopicPartition], group_metadata: Any) -> None:
        """Make committing ``offsets`` for the consumer's group part of the transaction."""
        offset_list = list(offsets)
        await self._txn(
            lambda producer: producer.send_offsets_to_transaction(offset_list, group_metadata, self._txn_timeout),
            "send offsets to transaction",
        )

    async def commit(self) -> None:
        """Commit the transaction: its records become visible to read_committed consumers, its offsets commit."""
        await self._txn(lambda producer: producer.commit_transaction(self._txn_timeout), "commit transaction", True)

    async def abort(self) -> None:
        """Abort the transaction: its records stay invisible, its offsets are not committed."""
        await self._txn(lambda producer: producer.abort_transaction(self._txn_timeout), "abort transaction", True)

    async def _txn(self, command: Callable[[Producer], Any], what: str, flushes: bool = False) -> Any:
        def run(producer: Producer) -> Any:
            try:
                if flushes:  # commit and abort wait for the records in flight, serving their delivery reports
                    return self._serving(command, producer)
                return command(producer)  # the loop goes on serving delivery reports meanwhile
            except KafkaException as exc:
                error = translate(exc, what)
                kafka_error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaClientError):
                    error.abortable = isinstance(kafka_error, KafkaError) and bool(kafka_error.txn_requires_abort())
                raise error from None

        return await self._call(run)
