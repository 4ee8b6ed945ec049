"""Background jobs: the idempotency-key and user-event purges, the dormant-account job (off
by default), the purge of soft-deleted users past their purge time, and the welcome e-mail
dispatcher.

The server runs both beside the gRPC service; `usersvc dispatch` runs the dispatcher alone.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.db import create_engine
from usersvc.adapters.outbox_repository import OutboxRepository
from usersvc.bootstrap import build_dispatcher
from usersvc.config import Settings
from usersvc.metrics import Metrics
from usersvc.services.user_events import UserEventFeed
from usersvc.services.users import UserService
from usersvc.tracing import instrument_engine, tracer_provider_from_env

log = logging.getLogger(__name__)

IDEMPOTENCY_PURGE_INTERVAL_SECONDS = 3600.0


async def purge_idempotency_keys_forever(
    users: UserService,
    *,
    interval: float = IDEMPOTENCY_PURGE_INTERVAL_SECONDS,
    ready: asyncio.Event | None = None,
) -> None:
    """Forget expired CreateUser request ids every `interval` s until cancelled; with `ready`,
    only while it is set (the database answers at the expected schema)."""
    while True:
        if ready is not None:
            await ready.wait()
        try:
            purged = await users.purge_idempotency_keys()
            if purged:
                log.info("purged idempotency keys", extra={"count": purged})
        except Exception:
            log.exception("purging idempotency keys failed; will try again")
        await asyncio.sleep(interval)


DORMANT_CHECK_INTERVAL_SECONDS = 3600.0


async def disable_dormant_users_forever(
    users: UserService,
    *,
    days: int,
    interval: float = DORMANT_CHECK_INTERVAL_SECONDS,
    ready: asyncio.Event | None = None,
) -> None:
    """Disable users not seen for `days` days, every `interval` s until cancelled; with
    `ready`, only while it is set. Several replicas may run it at once: each user is disabled
    under its row lock, once (the others find it disabled and skip it)."""
    while True:
        if ready is not None:
            await ready.wait()
        try:
            disabled = await users.disable_dormant_users(days=days)
            if disabled:
                log.info("disabled dormant users", extra={"count": disabled, "days": days})
        except Exception:
            log.exception("disabling dormant users failed; will try again")
        await asyncio.sleep(interval)


async def purge_user_events_forever(
    feed: UserEventFeed, *, interval: float, ready: asyncio.Event | None = None
) -> None:
    """Delete change-feed events older than the retention period every `interval` s until
    cancelled; with `ready`, only while it is set."""
    while True:
        if ready is not None:
            await ready.wait()
        try:
            purged = await feed.purge()
            if purged:
                log.info("purged user events", extra={"count": purged})
        except Exception:
            log.exception("purging user events failed; will try again")
        await asyncio.sleep(interval)


async def purge_deleted_users_forever(
    users: UserService, *, interval: float, ready: asyncio.Event | None = None
) -> None:
    """Remove soft-deleted users past their purge time every `interval` s until cancelled
    (UserService.purge_deleted_users); with `ready`, only while it is set. Every replica may
    run it: each user is purged under its row lock, once."""
    while True:
        if ready is not None:
            await ready.wait()
        try:
            purged = await users.purge_deleted_users()
            if purged:
                log.info("purged deleted users", extra={"count": purged})
        except Exception:
            log.exception("purging deleted users failed; will try again")
        await asyncio.sleep(interval)


OUTBOX_COUNT_INTERVAL_SECONDS = 15.0


async def count_outbox_forever(
    engine: AsyncEngine, metrics: Metrics, *, interval: float = OUTBOX_COUNT_INTERVAL_SECONDS
) -> None:
    """Keep the outbox gauges (pending, failed) near the database's counts until cancelled."""
    while True:
        try:
            async with engine.connect() as conn:
                counts = await OutboxRepository(conn).count_by_status()
            for state, count in counts.items():
                metrics.outbox_messages.labels(state).set(count)
        except Exception:
            log.warning("counting outbox messages failed; will try again", exc_info=True)
        await asyncio.sleep(interval)


async def dispatch_until_signalled(settings: Settings) -> int:
    """`usersvc dispatch`: run the dispatcher alone until SIGTERM or SIGINT.

    Returns the exit status: 0 after a clean stop, 2 when no SMTP host is configured.
    """
    engine = create_engine(settings.effective_database_url, pool_size=settings.db_pool_size)
    tracer_provider = tracer_provider_from_env()
    if tracer_provider is not None:
        instrument_engine(engine, tracer_provider)
    try:
        dispatcher = build_dispatcher(settings, engine, Metrics(), tracer_provider=tracer_provider)
        if dispatcher is None:
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await dispatcher.run_forever(stop)
        return 0
    finally:
        await engine.dispose()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # flushes the spans still queued for export
