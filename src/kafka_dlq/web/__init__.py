"""The HTTP ops API beside ``kafka-dlq run``: an app factory, no globals."""

from kafka_dlq.web.app import create_app, serve

__all__ = ["create_app", "serve"]
