"""The kafka-dlq fixtures (real Kafka, real Redis) come from kafka_dlq.testing.pytest_plugin, loaded in pyproject."""
