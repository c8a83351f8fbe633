"""A processor for the crash test, loaded by `kafka-dlq run` in a child process (processors = module:function).

It counts its calls per key in Redis (the test reads them back) and fails the first call of every fifth key.
"""

from __future__ import annotations

import asyncio
import os

from kafka_dlq.records import DeadLetter
from kafka_dlq.schedule import connect_redis

_client = None


async def process(dead_letter: DeadLetter) -> None:
    global _client
    if _client is None:
        _client = connect_redis(os.environ["CRASH_TEST_REDIS_URL"])
    key = (dead_letter.original.key or b"").decode()
    calls = await _client.hincrby(os.environ["CRASH_TEST_CALLS_KEY"], key, 1)
    await asyncio.sleep(0.01)
    if int(key.removeprefix("c")) % 5 == 0 and calls == 1:
        raise ConnectionError("first call fails")
