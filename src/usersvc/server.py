"""build_server(): the one place where the service is wired together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from userservice.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.bootstrap import Components, build_components, build_dispatcher
from usersvc.config import Settings
from usersvc.interceptors.access_log import AccessLogInterceptor
from usersvc.interceptors.auth import AuthInterceptor, policies_from
from usersvc.interceptors.errors import ErrorInterceptor
from usersvc.interceptors.request_id import RequestIdInterceptor
from usersvc.jobs import purge_idempotency_keys_forever
from usersvc.metrics import Metrics
from usersvc.servicers.auth_servicer import AuthServicer
from usersvc.servicers.user_servicer import UserServicer
from usersvc.services.auth import Authenticator
from usersvc.services.clock import utc_now
from usersvc.services.ports import Clock

log = logging.getLogger(__name__)

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
AUTH_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass
class RunningServer:
    """A built (not yet started) server and what must be closed with it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    components: Components
    metrics: Metrics = field(default_factory=Metrics)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Set when shutdown begins, so background loops finish their round and return.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None, *, drain: float = 0.0) -> None:
        """Health NOT_SERVING first (for `drain` s), then in-flight calls get `grace` s."""
        self.stopping.set()
        await self.health.enter_graceful_shutdown()
        if drain:
            await asyncio.sleep(drain)
        await self.server.stop(grace)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.components.close()


async def build_server(
    settings: Settings, *, clock: Clock = utc_now, reuse_port: bool = False
) -> RunningServer:
    """Wire every component from `settings` and bind the listen address (port 0: any)."""
    c = build_components(settings, clock=clock)
    policies = policies_from([user_service_pb2.DESCRIPTOR, auth_service_pb2.DESCRIPTOR])

    # Outermost first: the request id must exist before anything logs; the error mapper sits
    # inside the access log so that the log line records the mapped code, and outside auth so
    # that auth failures get the same rich details.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(),
        ErrorInterceptor(),
        AuthInterceptor(Authenticator(c.access_tokens, c.token_states), policies),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # Off unless several worker processes share the port on purpose: otherwise a second
            # server on the same address would silently take half the connections.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(c.users, c.audit), server)
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(c.auth), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", USER_SERVICE, AUTH_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    if settings.reflection:
        reflection.enable_server_reflection(
            (USER_SERVICE, AUTH_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    try:
        port = server.add_insecure_port(settings.listen_address)
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
    running = RunningServer(server=server, port=port, health=health_servicer, components=c)
    running.background.append(
        asyncio.create_task(purge_idempotency_keys_forever(c.users), name="idempotency-purge")
    )
    dispatcher = build_dispatcher(settings, c.engine, running.metrics, clock=clock)
    if dispatcher is not None:
        running.background.append(
            asyncio.create_task(dispatcher.run_forever(running.stopping), name="outbox-dispatcher")
        )
    return running


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await build_server(settings, reuse_port=reuse_port)
    await running.start()
    host = settings.listen_address.rsplit(":", 1)[0]
    log.info("serving", extra={"address": f"{host}:{running.port}", "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await running.stop(settings.shutdown_grace_seconds, drain=settings.shutdown_drain_seconds)
    log.info("stopped")
