"""build_server(): the one place where the service is wired together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from opentelemetry import trace

from userservice.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.adapters.schema_check import SchemaCheck, describe_url
from usersvc.bootstrap import Components, build_components, build_dispatcher
from usersvc.config import Settings
from usersvc.context import request_id_var
from usersvc.event_loop import running_kind
from usersvc.health import NOT_SERVING, SERVING, HealthServicer, Readiness
from usersvc.interceptors.access_log import AccessLogInterceptor
from usersvc.interceptors.auth import AuthInterceptor, policies_from
from usersvc.interceptors.base import InterceptorChain, UnaryWrappingInterceptor
from usersvc.interceptors.errors import ErrorInterceptor
from usersvc.interceptors.input_check import InputCheckInterceptor, RefusalHook
from usersvc.interceptors.malformed import MalformedRequestInterceptor
from usersvc.interceptors.rate_limit import RateLimitInterceptor, RateLimits
from usersvc.interceptors.request_id import RequestIdInterceptor
from usersvc.interceptors.shutdown_gate import ShutdownGateInterceptor
from usersvc.jobs import (
    count_outbox_forever,
    disable_dormant_users_forever,
    purge_deleted_users_forever,
    purge_idempotency_keys_forever,
    purge_user_events_forever,
)
from usersvc.logs import redact_undecodable_metadata
from usersvc.metrics import Metrics, MetricsEndpoint
from usersvc.migrate import script_revisions
from usersvc.reflection import enable_reflection
from usersvc.servicers.auth_servicer import AuthServicer
from usersvc.servicers.user_servicer import UserServicer
from usersvc.services.auth import Authenticator
from usersvc.services.clock import utc_now
from usersvc.services.ports import Clock
from usersvc.tls import server_credentials
from usersvc.tracing import instrument_engine, server_interceptor, tracer_provider_from_env

log = logging.getLogger(__name__)

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
AUTH_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
MAX_MESSAGE_BYTES = 1024 * 1024
READINESS_SERVICES = (USER_SERVICE, AUTH_SERVICE)
LOGIN_METHOD = f"/{AUTH_SERVICE}/Login"
QUIET_SECONDS = 0.1


@dataclass
class RunningServer:
    """A built (not yet started) server and what must be closed with it."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    readiness: Readiness
    gate: ShutdownGateInterceptor
    components: Components
    metrics: Metrics = field(default_factory=Metrics)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Set when shutdown begins, so background loops finish their round and return.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # The /metrics endpoint, when this server serves one itself (not under several workers).
    metrics_endpoint: MetricsEndpoint | None = None

    async def start(self) -> None:
        """Check the database once (readiness follows it from then on), then listen."""
        await self.readiness.check_once()
        if self.components.change_listener is not None:
            self.components.change_listener.start()
        self.background.append(
            asyncio.create_task(self.readiness.run(self.stopping), name="readiness")
        )
        await self.server.start()

    async def stop(self, grace: float | None, *, drain: float = 0.0) -> None:
        """Health NOT_SERVING first (for `drain` s); then new calls get UNAVAILABLE while
        in-flight calls get `grace` s."""
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        if drain:
            await asyncio.sleep(drain)
        self.gate.close()
        # Open WatchUserEvents streams end now with UNAVAILABLE and their resume token (a
        # stream never finishes on its own, so waiting for the grace period would be idle).
        self.components.feed.shut_down()
        # grpc core cancels (CANCELLED) calls it has accepted but not yet handed to us when
        # the server shuts down; wait until callers have stopped sending (they got
        # UNAVAILABLE with RetryInfo), for at most half the grace period.
        await self.gate.wait_quiet(QUIET_SECONDS, limit=min(grace or 0.0, 10.0) / 2)
        await self.server.stop(grace)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.readiness.close()
        await self.components.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()


async def build_server(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    reuse_port: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
) -> RunningServer:
    """Wire every component from `settings` and bind the listen address (port 0: any).

    `tracer_provider`: trace calls and database statements into it; None, no tracing at all.
    """
    # Whoever set up logging (the CLI, a test, an embedding program), no caller's metadata
    # value reaches it verbatim.
    redact_undecodable_metadata()
    metrics = Metrics()
    c = build_components(settings, clock=clock, metrics=metrics)
    if tracer_provider is not None:
        instrument_engine(c.engine, tracer_provider)
        if c.uow.read_engine is not c.engine:
            instrument_engine(c.uow.read_engine, tracer_provider)
    policies = policies_from([user_service_pb2.DESCRIPTOR, auth_service_pb2.DESCRIPTOR])

    # Outermost first: the request id must exist before anything logs; the error mapper sits
    # inside the access log so that the log line records the mapped code, and outside auth so
    # that auth failures get the same rich details.
    # One grpc interceptor for all of them: each method's handler is composed once (base.py).
    gate = ShutdownGateInterceptor()
    concerns: list[UnaryWrappingInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(metrics),
        ErrorInterceptor(settings.default_call_timeout_seconds),
        gate,
        # Before auth, which reads the request: a body that does not decode stops here.
        MalformedRequestInterceptor(),
        AuthInterceptor(Authenticator(c.access_tokens, c.token_states), policies),
        # After auth, which names the caller; before anything costly (hashing, the database).
        RateLimitInterceptor(
            RateLimits(
                reads=settings.rate_limit_reads,
                writes=settings.rate_limit_writes,
                login_per_peer=settings.rate_limit_login_per_peer,
                login_per_email=settings.rate_limit_login_per_email,
            ),
            on_refused=metrics.count_rate_limited,
        ),
        # Before any use case reads a field: control characters and unbounded sizes stop here.
        InputCheckInterceptor(on_refused={LOGIN_METHOD: _audit_refused_login(c)}),
    ]
    interceptors: list[grpc.aio.ServerInterceptor] = [InterceptorChain(concerns)]
    if tracer_provider is not None:
        # Outermost, so that the span is current while every other interceptor runs and the
        # access-log line carries its trace id. (OpenTelemetry's own interceptor: not one of
        # our concerns, so it stays a grpc interceptor of its own, and only when tracing is on.)
        interceptors.insert(0, server_interceptor(tracer_provider))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # Off unless several worker processes share the port on purpose: otherwise a second
            # server on the same address would silently take half the connections.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *connection_limits(settings),
        ],
        # Beyond this, grpc answers RESOURCE_EXHAUSTED at once instead of queueing.
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(
        UserServicer(c.users, c.audit, c.feed, c.codes), server
    )
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(c.auth), server)

    # Liveness ("") is SERVING while the process answers; readiness (the service names)
    # starts NOT_SERVING and follows the database from the first check on.
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", SERVING)
    for name in READINESS_SERVICES:
        await health_servicer.set(name, NOT_SERVING)
    heads, known = script_revisions()

    # Answers within the interval even while the database hangs (see SchemaCheck).
    check = SchemaCheck(
        c.engine, heads=heads, known=known, within=settings.readiness_interval_seconds
    )
    readiness = Readiness(
        health_servicer,
        READINESS_SERVICES,
        check,
        interval=settings.readiness_interval_seconds,
        close=check.close,
    )

    if settings.reflection:
        enable_reflection(server, (USER_SERVICE, AUTH_SERVICE, health.SERVICE_NAME))

    try:
        credentials = server_credentials(settings)
    except (OSError, ValueError):
        await c.close()
        raise
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen_address)
        else:
            port = server.add_secure_port(settings.listen_address, credentials)
    except RuntimeError as err:  # grpc's way of saying the bind failed
        port = 0
        bind_error: Exception | None = err
    else:
        bind_error = None
    if port == 0:
        await c.close()
        raise OSError(f"could not bind {settings.listen_address}: address in use or invalid") from (
            bind_error
        )
    running = RunningServer(
        server=server,
        port=port,
        health=health_servicer,
        readiness=readiness,
        gate=gate,
        components=c,
        metrics=metrics,
    )
    running.background.append(
        asyncio.create_task(
            # Readiness has already said why the database cannot be used: no purge until ready.
            purge_idempotency_keys_forever(c.users, ready=readiness.ready_event),
            name="idempotency-purge",
        )
    )
    running.background.append(
        asyncio.create_task(
            purge_user_events_forever(
                c.feed,
                interval=settings.user_events_purge_interval_seconds,
                ready=readiness.ready_event,
            ),
            name="user-events-purge",
        )
    )
    if settings.dormant_disable_days:
        running.background.append(
            asyncio.create_task(
                disable_dormant_users_forever(
                    c.users, days=settings.dormant_disable_days, ready=readiness.ready_event
                ),
                name="dormant-users",
            )
        )
    running.background.append(
        asyncio.create_task(
            purge_deleted_users_forever(
                c.users,
                interval=settings.deleted_user_purge_interval_seconds,
                ready=readiness.ready_event,
            ),
            name="deleted-user-purge",
        )
    )
    if settings.metrics_address:
        running.background.append(
            asyncio.create_task(count_outbox_forever(c.engine, metrics), name="outbox-count")
        )
    dispatcher = build_dispatcher(
        settings, c.engine, running.metrics, clock=clock, tracer_provider=tracer_provider
    )
    if dispatcher is not None:
        running.background.append(
            asyncio.create_task(dispatcher.run_forever(running.stopping), name="outbox-dispatcher")
        )
    return running


def _audit_refused_login(c: Components) -> RefusalHook:
    async def record(request: object) -> None:
        await c.auth.record_refused_login(request_id=request_id_var.get())

    return record


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def connection_limits(settings: Settings) -> list[tuple[str, int]]:
    """grpc core channel arguments for the connection and keepalive settings."""
    return [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_seconds)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.handshake_timeout_seconds)),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_seconds)),
        # Clients may keep idle connections alive with pings, but not flood them.
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            _ms(settings.keepalive_min_client_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
    ]


async def serve(
    settings: Settings, *, reuse_port: bool = False, metrics_endpoint: bool = True
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    `metrics_endpoint`: serve /metrics on settings.metrics_address (if set) from this process;
    worker processes leave it to their parent, which serves every worker's counts at once.
    """
    tracer_provider = tracer_provider_from_env()
    running = await build_server(settings, reuse_port=reuse_port, tracer_provider=tracer_provider)
    if metrics_endpoint and settings.metrics_address:
        try:
            running.metrics_endpoint = MetricsEndpoint(
                settings.metrics_address, running.metrics.registry
            )
        except OSError as err:
            await running.stop(0)
            raise OSError(f"could not serve metrics on {settings.metrics_address}: {err}") from err
    await running.start()
    host = settings.listen_address.rsplit(":", 1)[0]
    log.info(
        "serving",
        extra={
            "address": f"{host}:{running.port}",
            "pid": os.getpid(),
            "ready": running.readiness.ready,
            "database": describe_url(settings.effective_database_url),
            "tls": settings.tls_enabled,
            "mutual_tls": settings.tls_client_ca_file is not None,
            "tracing": tracer_provider is not None,
            "event_loop": running_kind(),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await running.stop(settings.shutdown_grace_seconds, drain=settings.shutdown_drain_seconds)
    if tracer_provider is not None:
        tracer_provider.shutdown()  # flushes the spans still queued for export
    log.info("stopped")
