"""Shared test set-up.

The kafka-dlq fixtures (real Kafka, real Redis) come from kafka_dlq.testing.pytest_plugin, loaded in pyproject.
Every async test runs under a blocking-call detector: blockbuster's rules (sleep, file and socket I/O, locks ...)
plus rules for confluent-kafka's calls that wait, which fail when made on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import confluent_kafka
import pytest
from blockbuster import BlockBuster, BlockBusterFunction


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _zero_timeout(index: int, name: str = "timeout") -> Callable[..., bool]:
    """Allowed when the call cannot wait: a timeout of exactly 0."""
    return lambda *args, **kwargs: _arg(args, kwargs, index, name, -1) == 0


def _kafka_rules() -> dict[str, BlockBusterFunction]:
    consumer, producer = confluent_kafka.Consumer, confluent_kafka.Producer
    never = lambda *args, **kwargs: False  # noqa: E731
    rules: dict[str, tuple[type, str, Callable[..., bool]]] = {
        "Consumer.poll": (consumer, "poll", _zero_timeout(1)),
        "Consumer.consume": (consumer, "consume", _zero_timeout(2)),
        # commit(message=None, offsets=None, asynchronous=True): by keyword or by position.
        "Consumer.commit": (consumer, "commit", lambda *a, **k: _arg(a, k, 3, "asynchronous", True) is True),
        "Consumer.committed": (consumer, "committed", _zero_timeout(2)),
        "Consumer.offsets_for_times": (consumer, "offsets_for_times", _zero_timeout(2)),
        # get_watermark_offsets(partition, timeout=None, cached=False) asks the broker unless cached.
        "Consumer.get_watermark_offsets": (
            consumer,
            "get_watermark_offsets",
            lambda *a, **k: _arg(a, k, 3, "cached", False) is True,
        ),
        "Consumer.list_topics": (consumer, "list_topics", _zero_timeout(2)),
        "Consumer.close": (consumer, "close", never),
        "Producer.poll": (producer, "poll", _zero_timeout(1)),
        "Producer.flush": (producer, "flush", _zero_timeout(1)),
        "Producer.list_topics": (producer, "list_topics", _zero_timeout(2)),
        # purge(in_queue=True, in_flight=True, blocking=True) waits for in-flight requests unless blocking=False.
        "Producer.purge": (producer, "purge", lambda *a, **k: _arg(a, k, 3, "blocking", True) is False),
        "Producer.init_transactions": (producer, "init_transactions", never),
        "Producer.begin_transaction": (producer, "begin_transaction", never),
        "Producer.send_offsets_to_transaction": (producer, "send_offsets_to_transaction", never),
        "Producer.commit_transaction": (producer, "commit_transaction", never),
        "Producer.abort_transaction": (producer, "abort_transaction", never),
        "Producer.close": (producer, "close", never),
    }
    return {
        f"confluent_kafka.{name}": BlockBusterFunction(owner, method, can_block_predicate=allowed)
        for name, (owner, method, allowed) in rules.items()
    }


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The test process' heap so far (pytest, hypothesis, schemathesis and every module the suite imported) moved out
    of the cyclic collector's reach for one test, then given back.

    A full collection walks every tracked object: on this heap that is a pause of 100 ms or more, which a loop-lag
    test would charge to the code under test. Objects the test itself makes are still collected as usual.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def blocking_detector() -> Iterator[BlockBuster]:
    """blockbuster with the confluent-kafka rules, active for the test."""
    detector = BlockBuster()
    detector.functions.update(_kafka_rules())
    detector.activate()
    try:
        yield detector
    finally:
        detector.deactivate()


@pytest.fixture(autouse=True)
def _detect_blocking_in_async_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    if inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        request.getfixturevalue("blocking_detector")
    yield


async def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Wait until ``condition()`` holds, failing the test with ``what`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
