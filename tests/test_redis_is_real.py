"""The Redis the tests run on is a real server, with AOF persistence on."""

from __future__ import annotations

from kafka_dlq.schedule import connect_redis


async def test_redis_answers_and_persists_with_aof(redis_url, unique_name):
    client = connect_redis(redis_url)
    try:
        key = unique_name("key")
        await client.set(key, b"\x00value\xff")
        assert await client.get(key) == b"\x00value\xff"
        persistence = await client.info("persistence")
        assert persistence["aof_enabled"] == 1
    finally:
        await client.aclose()
