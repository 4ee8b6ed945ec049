"""OpenTelemetry: a caller's trace continues through the server into database spans, the log
lines of the call carry its ids, and outbox delivery links back to the creating call."""

from __future__ import annotations

import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.e2e.conftest import ADMIN_EMAIL, CapturedLogs
from tests.smtp_server import SmtpServer
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    ensure_admin,
    login,
    make_settings,
    throwaway_database,
    throwaway_sqlite,
)
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub

PASSWORD = "tangerine orbit ladder 4711"


@dataclass
class TracedServer:
    thread: ServerThread
    exporter: InMemorySpanExporter
    mail: SmtpServer
    token: str

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def traced_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of its own: the session's holds other tests' undelivered outbox rows, which
    this server's dispatcher would otherwise work through first."""
    if request.param == "sqlite":
        with throwaway_sqlite() as url:
            yield url
    else:
        with throwaway_database(request.getfixturevalue("postgres_admin_url")) as url:
            yield url


@pytest.fixture(scope="module")
def traced(traced_database: str) -> Iterator[TracedServer]:
    database_url = traced_database
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tempfile.TemporaryDirectory() as data_dir, SmtpServer() as mail:
        settings = make_settings(
            database_url,
            data_dir,
            smtp_host="127.0.0.1",
            smtp_port=mail.port,
            smtp_timeout_seconds=2,
            outbox_poll_seconds=0.05,
        )
        ensure_admin(settings, ADMIN_EMAIL)
        thread = ServerThread(settings, tracer_provider=provider).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
            yield TracedServer(thread, exporter, mail, token)
        finally:
            thread.stop()
            provider.shutdown()


def traceparent() -> tuple[int, int, str]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


def metadata(server: TracedServer, parent: str, rid: str) -> tuple[tuple[str, str], ...]:
    return (
        ("authorization", f"Bearer {server.token}"),
        ("traceparent", parent),
        ("x-request-id", rid),
    )


def wait_for_spans(server: TracedServer, trace_id: int, count: int) -> list[ReadableSpan]:
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in server.spans() if s.context.trace_id == trace_id]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_a_callers_trace_continues_into_database_spans(
    traced: TracedServer, logs: CapturedLogs
) -> None:
    trace_id, client_span_id, parent = traceparent()
    rid = f"traced-{uuid.uuid4().hex}"
    with grpc.insecure_channel(traced.thread.address) as channel:
        UserServiceStub(channel).ListUsers(
            pb.ListUsersRequest(page_size=1), metadata=metadata(traced, parent, rid)
        )
    spans = wait_for_spans(traced, trace_id, 2)
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == ["/userservice.v1.UserService/ListUsers"]
    server_span = servers[0]
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span_id
    assert server_span.parent.is_remote
    database = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert database, [s.name for s in spans]
    assert all(
        s.parent is not None and s.parent.span_id == server_span.context.span_id for s in database
    )
    assert any("SELECT" in s.name or "SELECT" in str(s.attributes) for s in database)

    (line,) = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] == "rpc")
    assert line["trace_id"] == f"{trace_id:032x}"
    assert line["span_id"] == f"{server_span.context.span_id:016x}"


def test_a_refused_call_records_its_code_on_the_span(traced: TracedServer) -> None:
    trace_id, _, parent = traceparent()
    with grpc.insecure_channel(traced.thread.address) as channel, pytest.raises(grpc.RpcError):
        UserServiceStub(channel).GetUser(
            pb.GetUserRequest(id="not-a-uuid"), metadata=metadata(traced, parent, "bad-id")
        )
    (span,) = [s for s in wait_for_spans(traced, trace_id, 1) if s.kind is SpanKind.SERVER]
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # OpenTelemetry's conventions: a caller's mistake is not a server error.
    assert span.status.status_code is StatusCode.UNSET


def test_outbox_delivery_is_a_span_linked_to_the_creating_call(traced: TracedServer) -> None:
    trace_id, _, parent = traceparent()
    email = f"traced-{uuid.uuid4().hex[:10]}@example.com"
    with grpc.insecure_channel(traced.thread.address) as channel:
        UserServiceStub(channel).CreateUser(
            pb.CreateUserRequest(email=email, name="Traced", password=PASSWORD),
            metadata=metadata(traced, parent, "create"),
        )
    (create_span,) = [s for s in wait_for_spans(traced, trace_id, 1) if s.kind is SpanKind.SERVER]
    deadline = time.monotonic() + 10
    deliveries: list[ReadableSpan] = []
    while not deliveries and time.monotonic() < deadline:
        deliveries = [
            s
            for s in traced.spans()
            if s.kind is SpanKind.CONSUMER
            and any(link.context.trace_id == trace_id for link in s.links)
        ]
        time.sleep(0.02)
    assert deliveries, "no delivery span linked to the creating call"
    delivery = deliveries[0]
    assert delivery.name == "outbox deliver user.created"
    # Its own trace, linked (not parented) to the span of the call that wrote the row.
    assert delivery.context.trace_id != trace_id
    (link,) = delivery.links
    assert link.context.span_id == create_span.context.span_id
    assert traced.mail.handler.wait_for(1)


def test_health_probes_are_not_traced(traced: TracedServer) -> None:
    before = len(traced.spans())
    with grpc.insecure_channel(traced.thread.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    time.sleep(0.1)
    # Health probes are not traced (a kubelet calls them every few seconds).
    assert [s for s in traced.spans()[before:] if s.kind is SpanKind.SERVER] == []
