"""The Kafka client layer: the only code in kafka-dlq that calls librdkafka (confluent-kafka).

Every call that can wait runs on a dedicated thread per client; the event loop only queues work and awaits.
"""

from kafka_dlq.kafka.consumer import AsyncConsumer, CommitMode, next_offsets
from kafka_dlq.kafka.producer import AsyncProducer, Delivery, TransactionalProducer
from kafka_dlq.kafka.record import Headers, KafkaRecord

__all__ = [
    "AsyncConsumer",
    "AsyncProducer",
    "CommitMode",
    "Delivery",
    "Headers",
    "KafkaRecord",
    "TransactionalProducer",
    "next_offsets",
]
