"""The public surface is small and deliberate: a change to it is a change to this test."""

import kafka_dlq


def test_public_names_are_pinned():
    assert sorted(kafka_dlq.__all__) == sorted(
        [
            "AsyncConsumer",
            "Attempt",
            "AsyncProducer",
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
            "RecordTooLargeError",
            "Reason",
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
    )
    assert all(hasattr(kafka_dlq, name) for name in kafka_dlq.__all__)


def test_setup_errors_are_value_errors():
    assert issubclass(kafka_dlq.ConfigError, ValueError)
    assert issubclass(kafka_dlq.ConfigError, kafka_dlq.KafkaDLQError)
