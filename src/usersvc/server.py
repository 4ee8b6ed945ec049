"""build_server(): the one place where the service is wired together."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from userservice.v1 import user_service_pb2, user_service_pb2_grpc
from usersvc.adapters.db import create_engine
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.adapters.password_hasher import Argon2PasswordHasher
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.config import Settings
from usersvc.interceptors.access_log import AccessLogInterceptor
from usersvc.interceptors.errors import ErrorInterceptor
from usersvc.interceptors.request_id import RequestIdInterceptor
from usersvc.servicers.user_servicer import UserServicer
from usersvc.services.users import Clock, UserService, utc_now

log = logging.getLogger(__name__)

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass
class RunningServer:
    """A built (not yet started) server and what must be closed with it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    engine: AsyncEngine
    hasher: Argon2PasswordHasher
    background: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None, *, drain: float = 0.0) -> None:
        """Health NOT_SERVING first (for `drain` s), then in-flight calls get `grace` s."""
        await self.health.enter_graceful_shutdown()
        if drain:
            await asyncio.sleep(drain)
        await self.server.stop(grace)
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.engine.dispose()
        self.hasher.close()


def load_or_create_secret(settings: Settings) -> bytes:
    """The configured secret; in development, one generated once into data_dir."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured.encode()
    path = Path(settings.data_dir) / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        log.warning("no USERSVC_SECRET_KEY set: generated a development secret in %s", path)
    return path.read_text().strip().encode()


async def build_server(settings: Settings, *, clock: Clock = utc_now) -> RunningServer:
    """Wire every component from `settings` and bind the listen address (port 0: any)."""
    engine = create_engine(settings.effective_database_url, pool_size=settings.db_pool_size)
    hasher = Argon2PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_kib=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
        concurrency=settings.hash_concurrency,
    )
    uow = SqlUnitOfWorkFactory(engine)
    users = UserService(
        uow=uow,
        hasher=hasher,
        page_tokens=PageTokenCodec(load_or_create_secret(settings)),
        clock=clock,
    )

    # Outermost first: the request id must exist before anything logs; the error mapper sits
    # inside the access log so that the log line records the mapped code.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        RequestIdInterceptor(),
        AccessLogInterceptor(),
        ErrorInterceptor(),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(users), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", USER_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    if settings.reflection:
        reflection.enable_server_reflection(
            (USER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    port = server.add_insecure_port(settings.listen_address)
    if port == 0:
        raise OSError(f"could not bind {settings.listen_address}")
    return RunningServer(
        server=server, port=port, health=health_servicer, engine=engine, hasher=hasher
    )


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await build_server(settings)
    await running.start()
    host = settings.listen_address.rsplit(":", 1)[0]
    log.info("serving", extra={"address": f"{host}:{running.port}"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await running.stop(settings.shutdown_grace_seconds, drain=settings.shutdown_drain_seconds)
    log.info("stopped")
