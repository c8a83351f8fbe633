"""The public surface is small and deliberate: a change to it is a change to this test."""

import kafka_dlq


def test_public_names_are_pinned():
    assert sorted(kafka_dlq.__all__) == sorted(["ConfigError", "KafkaDLQError", "ServerError", "__version__"])


def test_setup_errors_are_value_errors():
    assert issubclass(kafka_dlq.ConfigError, ValueError)
    assert issubclass(kafka_dlq.ConfigError, kafka_dlq.KafkaDLQError)
