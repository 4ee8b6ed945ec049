"""Builds the application's components from settings; shared by the server and the CLI."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from opentelemetry import trace
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.change_signal import LocalChangeSignal, PostgresChangeListener
from usersvc.adapters.common_passwords import load_common_passwords
from usersvc.adapters.db import create_engine, create_read_engine
from usersvc.adapters.jwt_tokens import AccessTokenCodec, load_or_create_keys
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.adapters.password_hasher import Argon2PasswordHasher
from usersvc.adapters.point_reads import PostgresPointReads, SqlitePointReads
from usersvc.adapters.resume_tokens import ResumeTokenCodec
from usersvc.adapters.secret_files import create_once
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.adapters.user_event_repository import (
    PostgresUserEventSource,
    SqliteUserEventSource,
)
from usersvc.config import Settings
from usersvc.metrics import Metrics
from usersvc.notifications.dispatcher import OutboxDispatcher
from usersvc.notifications.smtp import SmtpSender
from usersvc.services.account_codes import AccountCodeService
from usersvc.services.audit import AuditService
from usersvc.services.auth import AuthService, TokenStateCache
from usersvc.services.clock import utc_now
from usersvc.services.point_reads import UnitOfWorkPointReads
from usersvc.services.ports import Clock, UserEventSource, UserPointReads
from usersvc.services.user_events import UserEventFeed
from usersvc.services.users import UserService

log = logging.getLogger(__name__)

# SQLite shared by several worker processes: no cross-process wake-up, so watchers poll often.
SQLITE_WORKERS_POLL_SECONDS = 0.2
DISPATCHER_OFF_MESSAGE = "welcome e-mail dispatcher is off: USERSVC_SMTP_HOST is not set"


@dataclass
class Components:
    """Everything a request path needs, wired once; no module-level singletons."""

    settings: Settings
    engine: AsyncEngine
    hasher: Argon2PasswordHasher
    uow: SqlUnitOfWorkFactory
    access_tokens: AccessTokenCodec
    token_states: TokenStateCache
    users: UserService
    auth: AuthService
    audit: AuditService
    point_reads: PointReads
    feed: UserEventFeed
    change_signal: LocalChangeSignal
    # PostgreSQL: wakes this process's watchers on commits made anywhere; started by the server.
    change_listener: PostgresChangeListener | None
    codes: AccountCodeService

    async def close(self) -> None:
        if self.change_listener is not None:
            await self.change_listener.stop()
        await self.point_reads.close()
        await self.engine.dispose()
        if self.uow.read_engine is not self.engine:
            await self.uow.read_engine.dispose()
        self.hasher.close()


def load_or_create_secret(settings: Settings) -> bytes:
    """The configured secret; in development, one generated once into data_dir."""
    configured = settings.secret_key.get_secret_value()
    if configured:
        return configured.encode()
    path = Path(settings.data_dir) / "secret_key"
    if not path.exists() and create_once(path, secrets.token_urlsafe(48).encode()):
        log.warning("no USERSVC_SECRET_KEY set: generated a development secret in %s", path)
    return path.read_text().strip().encode()


def create_engines(settings: Settings) -> tuple[AsyncEngine, AsyncEngine | None, int]:
    """The write engine, on PostgreSQL the autocommit read engine, and how many connections
    the point reads may hold; together at most `db_pool_size` connections.

    On PostgreSQL reads get half (rounded down): the point reads (every authenticated call's
    token check, GetUser) the larger part of it, list queries the rest.
    """
    url = settings.effective_database_url
    read_share = settings.db_pool_size // 2
    point_share = (read_share + 1) // 2 if read_share >= 2 else 0
    read_share -= point_share
    read_engine = create_read_engine(url, pool_size=read_share) if read_share else None
    write_share = settings.db_pool_size - (read_share if read_engine is not None else 0)
    if read_engine is not None:
        write_share -= point_share
    return create_engine(url, pool_size=write_share), read_engine, point_share


class PointReads(UserPointReads, Protocol):
    async def close(self) -> None: ...


def create_point_reads(
    settings: Settings, uow: SqlUnitOfWorkFactory, *, pool_size: int
) -> PointReads:
    """The cheapest sound path for the per-call reads on this database (see point_reads)."""
    portable = ClosablePointReads(uow)
    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "postgresql":
        if pool_size:
            return PostgresPointReads(settings.effective_database_url, size=pool_size)
        return portable
    if url.database and url.database != ":memory:":
        return SqlitePointReads(Path(url.database), fallback=portable)
    return portable


class ClosablePointReads(UnitOfWorkPointReads):
    async def close(self) -> None:
        return None


def build_dispatcher(
    settings: Settings,
    engine: AsyncEngine,
    metrics: Metrics,
    *,
    clock: Clock = utc_now,
    tracer_provider: trace.TracerProvider | None = None,
) -> OutboxDispatcher | None:
    """The dispatcher `settings` describe, or None (said once in the log) without an SMTP host."""
    if not settings.smtp_host:
        log.info(DISPATCHER_OFF_MESSAGE)
        return None
    return OutboxDispatcher(
        uow=SqlUnitOfWorkFactory(engine),
        sender=SmtpSender.from_settings(settings),
        metrics=metrics,
        sender_address=settings.smtp_sender,
        clock=clock,
        batch_size=settings.outbox_batch_size,
        poll_seconds=settings.outbox_poll_seconds,
        lease_seconds=settings.outbox_lease_seconds,
        send_timeout_seconds=settings.smtp_timeout_seconds,
        max_attempts=settings.outbox_max_attempts,
        backoff_base_seconds=settings.outbox_backoff_base_seconds,
        backoff_max_seconds=settings.outbox_backoff_max_seconds,
        tracer=trace.get_tracer(__name__, tracer_provider=tracer_provider)
        if tracer_provider is not None
        else None,
    )


def build_components(
    settings: Settings, *, clock: Clock = utc_now, metrics: Metrics | None = None
) -> Components:
    """Create the engine, hasher, token codecs and use cases described by `settings`;
    with `metrics`, pools, the hashing queue and login failures report to it."""
    engine, read_engine, point_share = create_engines(settings)
    if metrics is not None:
        metrics.watch_pool("primary", engine)
        if read_engine is not None:
            metrics.watch_pool("read", read_engine)
    hasher = Argon2PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_kib=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
        concurrency=settings.hash_concurrency,
        queue_limit=settings.hash_queue_limit,
        queue_hooks=metrics.hash_queue_hooks() if metrics is not None else None,
    )
    change_signal = LocalChangeSignal()
    uow = SqlUnitOfWorkFactory(engine, read_engine, on_user_events=change_signal.notify)
    keys = load_or_create_keys(
        settings.jwt_signing_key_file, settings.verification_key_paths, Path(settings.data_dir)
    )
    access_tokens = AccessTokenCodec(
        keys,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_seconds=settings.access_token_ttl_seconds,
        leeway=settings.jwt_leeway_seconds,
    )
    point_reads = create_point_reads(settings, uow, pool_size=point_share)
    token_states = TokenStateCache(uow, ttl=settings.token_cache_seconds, point_reads=point_reads)
    secret = load_or_create_secret(settings)
    page_tokens = PageTokenCodec(secret)
    users = UserService(
        uow=uow,
        hasher=hasher,
        page_tokens=page_tokens,
        clock=clock,
        common_passwords=load_common_passwords(),
        on_tokens_revoked=token_states.invalidate,
        fingerprint_key=hashlib.sha256(b"usersvc idempotency fingerprints v1\0" + secret).digest(),
        idempotency_ttl_seconds=settings.idempotency_ttl_seconds,
        deleted_user_retention=timedelta(days=settings.deleted_user_retention_days),
        login_max_failures=settings.login_max_failures,
        login_lock_seconds=settings.login_lock_seconds,
        point_reads=point_reads,
    )
    audit = AuditService(uow=uow, page_tokens=page_tokens)
    codes = AccountCodeService(
        uow=uow,
        hasher=hasher,
        clock=clock,
        verification_ttl=timedelta(seconds=settings.email_verification_code_ttl_seconds),
        recovery_ttl=timedelta(seconds=settings.recovery_code_ttl_seconds),
        max_attempts=settings.one_time_code_max_attempts,
        check_new_password=users.check_new_password,
        on_tokens_revoked=token_states.invalidate,
    )
    postgres = make_url(settings.effective_database_url).get_backend_name() == "postgresql"
    source: UserEventSource
    poll = settings.watch_poll_seconds
    if postgres:
        source = PostgresUserEventSource(read_engine or engine)
    else:
        source = SqliteUserEventSource(engine)
        if settings.workers > 1:
            poll = min(poll, SQLITE_WORKERS_POLL_SECONDS)
    feed = UserEventFeed(
        source=source,
        signal=change_signal,
        tokens=ResumeTokenCodec(secret),
        clock=clock,
        retention_seconds=settings.user_events_retention_seconds,
        poll_seconds=poll,
        checkpoint_seconds=settings.watch_checkpoint_seconds,
        slow_consumer_seconds=settings.watch_slow_consumer_seconds,
    )
    auth = AuthService(
        uow=uow,
        hasher=hasher,
        dummy_hash=hasher.dummy_hash,
        tokens=access_tokens,
        states=token_states,
        refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
        max_failures=settings.login_max_failures,
        lock_seconds=settings.login_lock_seconds,
        clock=clock,
        on_login_failure=metrics.count_login_failure if metrics is not None else None,
        point_reads=point_reads,
    )
    return Components(
        settings=settings,
        engine=engine,
        hasher=hasher,
        uow=uow,
        access_tokens=access_tokens,
        token_states=token_states,
        users=users,
        auth=auth,
        audit=audit,
        point_reads=point_reads,
        feed=feed,
        change_signal=change_signal,
        change_listener=PostgresChangeListener(settings.effective_database_url, change_signal)
        if postgres
        else None,
        codes=codes,
    )
