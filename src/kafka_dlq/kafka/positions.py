"""Where a running :class:`AsyncConsumer` has read to: the only way, under ``read_committed``, to see that a
partition has been read past a given offset when transaction markers or aborted records end it (the consumer
never delivers those, so no record says so)."""

from __future__ import annotations

from confluent_kafka import Consumer

from kafka_dlq.kafka.consumer import AsyncConsumer

__all__ = ["positions"]


async def positions(consumer: AsyncConsumer) -> dict[tuple[str, int], int]:
    """Per assigned partition, the offset the consumer's thread reads next (-1001 before its first fetch).

    Records the thread read before this call are in the consumer's buffer (or taken from it) when it returns: both
    reach the loop in the order the thread sent them.
    """

    def read(client: Consumer) -> dict[tuple[str, int], int]:
        return {(tp.topic, tp.partition): tp.offset for tp in client.position(client.assignment())}

    return await consumer._call(read)
