"""Prometheus metrics, on a registry owned by the server (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """Every metric of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.outbox_delivered = Counter(
            "usersvc_outbox_delivered",
            "Outbox messages delivered",
            ["topic"],
            registry=self.registry,
        )
        self.outbox_retried = Counter(
            "usersvc_outbox_retried",
            "Outbox delivery attempts that failed and will be retried",
            ["topic"],
            registry=self.registry,
        )
        self.outbox_failed = Counter(
            "usersvc_outbox_failed",
            "Outbox messages given up after the maximum attempts",
            ["topic"],
            registry=self.registry,
        )
