"""kafka-dlq: dead-letter queues for Apache Kafka in Python and asyncio.

>>> from kafka_dlq import DLQHandler, RetryPolicy
>>> handler = DLQHandler(name="billing", topics=["payments.dlq"], bootstrap_servers="127.0.0.1:19092",
...                      redis_url="redis://127.0.0.1:16379/0", policies=RetryPolicy(max_attempts=5))
"""

from kafka_dlq.breaker import BreakerSettings, CircuitState
from kafka_dlq.classify import Classifier, Decision
from kafka_dlq.errors import (
    BrokerUnreachableError,
    ClientClosedError,
    ConfigError,
    DeliveryError,
    KafkaClientError,
    KafkaDLQError,
    RecordTooLargeError,
    ServerError,
    TopicNotFoundError,
)
from kafka_dlq.formats import Undecodable, decode, encode_native
from kafka_dlq.handler import DLQHandler, KeyFormat, Mode
from kafka_dlq.kafka import AsyncConsumer, AsyncProducer, KafkaRecord, TransactionalProducer
from kafka_dlq.loop_lag import LoopLagProbe
from kafka_dlq.outcomes import Outcome, ParkNow, Reason, RetryLater
from kafka_dlq.policy import Backoff, Jitter, RetryPolicy, TopicPolicies
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.retrying import Attempt, Ordering, RetryingConsumer, current_attempt

__version__ = "0.1.0"

__all__ = [
    "AsyncConsumer",
    "AsyncProducer",
    "Attempt",
    "Backoff",
    "BreakerSettings",
    "BrokerUnreachableError",
    "CircuitState",
    "Classifier",
    "ClientClosedError",
    "ConfigError",
    "DLQHandler",
    "DeadLetter",
    "Decision",
    "DeliveryError",
    "DlqCoordinates",
    "Failure",
    "Jitter",
    "KafkaClientError",
    "KafkaDLQError",
    "KafkaRecord",
    "KeyFormat",
    "LoopLagProbe",
    "Mode",
    "Ordering",
    "OriginalRecord",
    "Outcome",
    "ParkNow",
    "Reason",
    "RecordTooLargeError",
    "RetryLater",
    "RetryPolicy",
    "RetryingConsumer",
    "ServerError",
    "TopicNotFoundError",
    "TopicPolicies",
    "TransactionalProducer",
    "Undecodable",
    "__version__",
    "current_attempt",
    "decode",
    "encode_native",
]
