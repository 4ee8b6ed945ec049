"""Prometheus metrics, on a registry owned by the server (no module-level singletons).

gRPC metrics use the names Go's grpc-prometheus made standard, so existing dashboards and
alerts work unchanged. With several worker processes, prometheus_client's multiprocess mode
is switched on before the workers fork (see `enable_multiprocess`); every worker then writes
its values to files in one per-run directory and the parent serves one /metrics over all.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Label values of grpc_type, as grpc-prometheus spells them.
UNARY = "unary"
SERVER_STREAM = "server_stream"
CLIENT_STREAM = "client_stream"
BIDI_STREAM = "bidi_stream"
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


def split_method(full_method: str) -> tuple[str, str]:
    """("pkg.Service", "Method") from "/pkg.Service/Method"."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


STARTED_HELP = "RPCs started on the server"
HANDLED_HELP = "RPCs completed on the server, whatever their status code"
HANDLING_HELP = "Time from the start of an RPC to its status, on the server"
HANDLING_BUCKETS = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))
# The `le` labels, spelled as prometheus_client spells them.
_BUCKET_LABELS = [*(floatToGoString(b) for b in HANDLING_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]


class RpcMetrics:
    """The gRPC metrics of one method, resolved once so that a call only increments.

    The interface of both kinds: `started()` when a call begins, `handled(code, seconds)`
    when it ends (code a grpc.StatusCode).
    """

    labels: tuple[str, str, str]

    def started(self) -> None:
        raise NotImplementedError

    def handled(self, code: Any, seconds: float) -> None:
        raise NotImplementedError


class LocalRpcMetrics(RpcMetrics):
    """Plain numbers, read by `GrpcCollector` at scrape time: no locks, no per-call checks.

    Only the server's event-loop thread writes them; a scrape from the HTTP thread reads
    values at most one call old.
    """

    __slots__ = ("bucket_counts", "handled_by_code", "labels", "seconds_sum", "started_count")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.started_count = 0
        self.handled_by_code: dict[Any, int] = {}
        # One slot per bucket bound, the last for +Inf; not cumulative (the collector sums).
        self.bucket_counts = [0] * (len(HANDLING_BUCKETS) + 1)
        self.seconds_sum = 0.0

    def started(self) -> None:
        self.started_count += 1

    def handled(self, code: Any, seconds: float) -> None:
        by_code = self.handled_by_code
        by_code[code] = by_code.get(code, 0) + 1
        self.bucket_counts[bisect.bisect_left(HANDLING_BUCKETS, seconds)] += 1
        self.seconds_sum += seconds


class GrpcCollector(Collector):
    """grpc_server_started_total, _handled_total and _handling_seconds from LocalRpcMetrics."""

    def __init__(self) -> None:
        self.methods: list[LocalRpcMetrics] = []

    def collect(self) -> Iterator[Metric]:
        started = CounterMetricFamily("grpc_server_started", STARTED_HELP, labels=RPC_LABELS)
        handled = CounterMetricFamily(
            "grpc_server_handled", HANDLED_HELP, labels=(*RPC_LABELS, "grpc_code")
        )
        handling = HistogramMetricFamily(
            "grpc_server_handling_seconds", HANDLING_HELP, labels=RPC_LABELS
        )
        for rpc in list(self.methods):
            started.add_metric(rpc.labels, rpc.started_count)
            for code, count in list(rpc.handled_by_code.items()):
                handled.add_metric((*rpc.labels, code.name), count)
            cumulative = list(itertools.accumulate(rpc.bucket_counts))
            handling.add_metric(
                rpc.labels, list(zip(_BUCKET_LABELS, cumulative, strict=True)), rpc.seconds_sum
            )
        yield started
        yield handled
        yield handling


class SharedRpcMetrics(RpcMetrics):
    """prometheus_client metrics: in multiprocess mode their values live in the shared
    directory, so the parent's scrape sums every worker."""

    __slots__ = ("_handled", "_handled_by_code", "_started", "handling_seconds", "labels")

    def __init__(
        self, started: Counter, handled: Counter, handling: Histogram, labels: tuple[str, str, str]
    ) -> None:
        self.labels = labels
        self._started = started.labels(*labels)
        self.handling_seconds = handling.labels(*labels)
        self._handled = handled
        self._handled_by_code: dict[Any, Any] = {}

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: Any, seconds: float) -> None:
        child = self._handled_by_code.get(code)
        if child is None:
            child = self._handled.labels(*self.labels, code.name)
            self._handled_by_code[code] = child
        child.inc()
        self.handling_seconds.observe(seconds)


class Metrics:
    """Every metric of one server instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.outbox_delivered = Counter(
            "usersvc_outbox_delivered", "Outbox messages delivered", ["topic"], registry=r
        )
        self.outbox_retried = Counter(
            "usersvc_outbox_retried",
            "Outbox delivery attempts that failed and will be retried",
            ["topic"],
            registry=r,
        )
        self.outbox_failed = Counter(
            "usersvc_outbox_failed",
            "Outbox messages given up after the maximum attempts",
            ["topic"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "usersvc_outbox_messages",
            "Outbox messages by state (pending, failed), as last counted in the database",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # gRPC call metrics: plain numbers rendered at scrape time in one process (the per-call
        # cost of locked prometheus_client values is several times that); prometheus_client's
        # own metrics under several workers, where the values must reach the shared files.
        self._grpc_shared: tuple[Counter, Counter, Histogram] | None = None
        self._grpc_collector: GrpcCollector | None = None
        if multiprocess_enabled():
            self._grpc_shared = (
                Counter("grpc_server_started", STARTED_HELP, RPC_LABELS, registry=r),
                Counter(
                    "grpc_server_handled", HANDLED_HELP, (*RPC_LABELS, "grpc_code"), registry=r
                ),
                Histogram("grpc_server_handling_seconds", HANDLING_HELP, RPC_LABELS, registry=r),
            )
        else:
            self._grpc_collector = GrpcCollector()
            r.register(self._grpc_collector)
        self.db_pool_in_use = Gauge(
            "usersvc_db_pool_connections_in_use",
            "Database connections checked out of the pool",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.db_pool_size = Gauge(
            "usersvc_db_pool_size",
            "Database connections the pool keeps (without overflow)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.login_failures = Counter(
            "usersvc_login_failures",
            "Failed logins by reason (unknown_email, wrong_password, locked, disabled, ...)",
            ["reason"],
            registry=r,
        )
        self.login_lockouts = Counter(
            "usersvc_login_lockouts",
            "Accounts locked after too many consecutive failed logins",
            registry=r,
        )
        self.rate_limited = Counter(
            "usersvc_rate_limited",
            "Calls refused by a rate or concurrency limit",
            ["grpc_service", "grpc_method", "limit"],
            registry=r,
        )
        self.hash_queue_depth = Gauge(
            "usersvc_password_hash_queue_depth",
            "Password hashes waiting for a hashing slot",
            registry=r,
            multiprocess_mode="livesum",
        )

    def for_rpc(self, grpc_type: str, full_method: str) -> RpcMetrics:
        service, method = split_method(full_method)
        labels = (grpc_type, service, method)
        if self._grpc_shared is not None:
            return SharedRpcMetrics(*self._grpc_shared, labels)
        assert self._grpc_collector is not None
        local = LocalRpcMetrics(labels)
        self._grpc_collector.methods.append(local)
        return local

    def count_rate_limited(self, full_method: str, limit: str = "rate") -> None:
        """The hook for limiters: one call to `full_method` refused by `limit`."""
        service, method = split_method(full_method)
        self.rate_limited.labels(service, method, limit).inc()

    def count_login_failure(self, reason: str, locked_out: bool) -> None:
        """The hook for the login use case: one failed login; `locked_out` when it locked."""
        self.login_failures.labels(reason).inc()
        if locked_out:
            self.login_lockouts.inc()

    def watch_pool(self, name: str, engine: Any) -> None:
        """Track checkouts of a SQLAlchemy engine's pool (engine: sync or async)."""
        from sqlalchemy import event

        sync_engine = getattr(engine, "sync_engine", engine)
        in_use = self.db_pool_in_use.labels(name)
        size = getattr(sync_engine.pool, "size", None)  # QueuePool; a static pool holds one
        self.db_pool_size.labels(name).set(size() if callable(size) else 1)
        # Counted by the connection record, not by event: SQLAlchemy also "checks in" a
        # connection whose checkout failed (a database that hangs or went away), which an
        # event count would take below zero.
        key = f"usersvc_in_use_{name}"

        def checked_out(_dbapi: Any, record: Any, _proxy: Any) -> None:
            if not record.record_info.get(key):
                record.record_info[key] = True
                in_use.inc()

        def checked_in(_dbapi: Any, record: Any) -> None:
            if record is not None and record.record_info.pop(key, False):
                in_use.dec()

        event.listen(sync_engine, "checkout", checked_out)
        event.listen(sync_engine, "checkin", checked_in)

    def hash_queue_hooks(self) -> tuple[Callable[[], None], Callable[[], None]]:
        """(enqueued, dequeued) callables for the password hasher's waiting line."""
        gauge = self.hash_queue_depth
        return gauge.inc, gauge.dec


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROCESS_ENV))


def enable_multiprocess() -> Path:
    """Switch this process (and the workers it forks) to multiprocess mode; returns the
    per-run directory, which the caller removes when the workers are gone."""
    directory = Path(tempfile.mkdtemp(prefix="usersvc-metrics-"))
    os.environ[MULTIPROCESS_ENV] = str(directory)
    # prometheus_client chooses its value class when it is first imported; choose again, now
    # that the directory is set, so metrics created from here on write to it.
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


def disable_multiprocess(directory: Path) -> None:
    os.environ.pop(MULTIPROCESS_ENV, None)
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
    shutil.rmtree(directory, ignore_errors=True)


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every worker's files in the multiprocess directory."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def mark_worker_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (pool in use, queue depth) from the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class MetricsEndpoint:
    """GET /metrics over HTTP on its own address, in a daemon thread."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=registry
        )
        self.port: int = self._server.server_address[1]
        log.info("metrics endpoint listening", extra={"address": f"{host}:{self.port}"})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
