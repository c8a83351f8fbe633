"""The handler's metrics, in Prometheus form and as a plain dict (``get_metrics``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kafka_dlq.outcomes import Reason

__all__ = ["HandlerMetrics"]

_DELAY_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


class HandlerMetrics:
    """One registry per handler (no process-wide globals), labelled by original topic."""

    def __init__(self, handler: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["handler", "topic"]
        self.handler = handler
        self.consumed = Counter(
            "kafka_dlq_consumed", "Dead letters read from the DLQ topics", labels, registry=self.registry
        )
        self.retried = Counter(
            "kafka_dlq_retried", "Failed attempts scheduled for a retry", labels, registry=self.registry
        )
        self.recovered = Counter("kafka_dlq_recovered", "Dead letters recovered", labels, registry=self.registry)
        self.parked = Counter(
            "kafka_dlq_parked", "Dead letters parked in the poison topic", [*labels, "reason"], registry=self.registry
        )
        self.deferred = Counter(
            "kafka_dlq_deferred", "Due retries deferred by an open circuit", labels, registry=self.registry
        )
        self.lost_claims = Counter(
            "kafka_dlq_lost_claims",
            "Claims whose lease expired before they finished",
            ["handler"],
            registry=self.registry,
        )
        self.pending = Gauge("kafka_dlq_pending", "Entries in the retry schedule", ["handler"], registry=self.registry)
        self.retry_delay = Histogram(
            "kafka_dlq_retry_delay_seconds",
            "Delay before a retry",
            ["handler"],
            buckets=_DELAY_BUCKETS,
            registry=self.registry,
        )
        self.processor_latency = Histogram(
            "kafka_dlq_processor_seconds",
            "Processor call duration",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "kafka_dlq_event_loop_lag_seconds",
            "Event-loop lag, p99 of the last minute",
            ["handler"],
            registry=self.registry,
        )
        self.circuit = Gauge(
            "kafka_dlq_circuit_state",
            "Circuit per original topic: 0 closed, 1 half open, 2 open",
            labels,
            registry=self.registry,
        )
        self._totals = {"consumed": 0, "retried": 0, "recovered": 0, "parked": 0, "deferred": 0}
        self._parked_by_reason: dict[str, int] = {}
        self._pending = 0
        # The labelled children, looked up once: labels() takes a lock and builds a tuple on every call, and the
        # handler counts several times per record.
        self._children: dict[tuple[str, str, str | None], Any] = {}

    def count(self, what: str, topic: str, reason: Reason | str | None = None, n: int = 1) -> None:
        """Count ``n`` records of ``topic`` that were ``what`` (consumed, retried, recovered, parked, deferred)."""
        self._totals[what] += n
        key = None if what != "parked" else str(reason or "unknown")
        child = self._children.get((what, topic, key))
        if child is None:
            if key is None:
                child = getattr(self, what).labels(self.handler, topic)
            else:
                child = self.parked.labels(self.handler, topic, key)
            self._children[(what, topic, key)] = child
        if key is not None:
            self._parked_by_reason[key] = self._parked_by_reason.get(key, 0) + n
        child.inc(n)

    def latency(self, topic: str) -> Any:
        """The processor latency histogram of ``topic`` (``.observe(seconds)``)."""
        child = self._children.get(("latency", topic, None))
        if child is None:
            child = self._children[("latency", topic, None)] = self.processor_latency.labels(self.handler, topic)
        return child

    def delay(self) -> Any:
        """The retry delay histogram (``.observe(seconds)``)."""
        child = self._children.get(("delay", "", None))
        if child is None:
            child = self._children[("delay", "", None)] = self.retry_delay.labels(self.handler)
        return child

    def circuit_of(self, topic: str) -> Any:
        """The circuit state gauge of ``topic`` (``.set(state)``)."""
        child = self._children.get(("circuit", topic, None))
        if child is None:
            child = self._children[("circuit", topic, None)] = self.circuit.labels(self.handler, topic)
        return child

    def set_pending(self, value: int) -> None:
        self._pending = value
        self.pending.labels(self.handler).set(value)

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def as_dict(self) -> dict[str, Any]:
        """Totals, with the seed system's names too (``messages_processed`` ... ``current_queue_size``)."""
        t = self._totals
        return {
            **t,
            "parked_by_reason": dict(self._parked_by_reason),
            "pending": self._pending,
            "messages_processed": t["consumed"],
            "messages_retried": t["retried"],
            "messages_recovered": t["recovered"],
            "messages_poisoned": t["parked"],
            "current_queue_size": self._pending,
        }
