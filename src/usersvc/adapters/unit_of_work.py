"""Unit of work: one transaction per use case, rolled back unless committed explicitly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usersvc.adapters.audit_repository import AuditRepository
from usersvc.adapters.db import SQLITE_WRITE, is_sqlite
from usersvc.adapters.db_errors import raise_translated
from usersvc.adapters.idempotency_repository import IdempotencyRepository
from usersvc.adapters.one_time_code_repository import OneTimeCodeRepository
from usersvc.adapters.outbox_repository import OutboxRepository
from usersvc.adapters.refresh_token_repository import RefreshTokenRepository
from usersvc.adapters.user_event_repository import UserEventRepository
from usersvc.adapters.user_repository import UserRepository
from usersvc.context import deadline_var
from usersvc.domain.errors import StorageUnavailable

log = logging.getLogger(__name__)

# Left for the statement timeout to fire before the caller's own timer does, so that the
# database ends the statement itself instead of a cancel racing the task's cancellation.
DEADLINE_MARGIN_SECONDS = 0.05


class SqlUnitOfWork:
    """A transaction on one pooled connection, with the repositories bound to it."""

    users: UserRepository
    outbox: OutboxRepository
    refresh_tokens: RefreshTokenRepository
    audit: AuditRepository
    idempotency: IdempotencyRepository
    user_events: UserEventRepository
    one_time_codes: OneTimeCodeRepository

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        write: bool,
        on_user_events: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._write = write
        self._on_user_events = on_user_events
        self._conn: AsyncConnection | None = None
        self._committed = False

    async def __aenter__(self) -> Self:
        try:
            conn = await self._engine.connect()
            if self._write and is_sqlite(self._engine):
                await conn.execution_options(**{SQLITE_WRITE: True})
            await conn.begin()
            deadline = deadline_var.get()
            if deadline is not None and self._write and not is_sqlite(self._engine):
                # The caller's remaining time bounds every statement of this transaction,
                # even one waiting on a lock or a database that has stopped answering.
                left = deadline - time.monotonic() - DEADLINE_MARGIN_SECONDS
                await conn.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}"
                )
        except Exception as err:
            raise_translated(err)
            raise
        self._conn = conn
        self.users = UserRepository(conn)
        self.outbox = OutboxRepository(conn)
        self.refresh_tokens = RefreshTokenRepository(conn)
        self.audit = AuditRepository(conn)
        self.idempotency = IdempotencyRepository(conn)
        self.user_events = UserEventRepository(conn, postgres=not is_sqlite(self._engine))
        self.one_time_codes = OneTimeCodeRepository(conn)
        return self

    async def commit(self) -> None:
        assert self._conn is not None
        try:
            await self._conn.commit()
        except Exception as err:
            raise_translated(err)
            raise
        self._committed = True
        if self.user_events.added and self._on_user_events is not None:
            # Readers in this process wake at once; other processes by NOTIFY or polling.
            self._on_user_events()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not self._committed:
                await conn.rollback()
        except Exception as err:
            # The connection may be gone; the error that got us here matters more.
            log.warning("rollback failed: %s", type(err).__name__)
        finally:
            await conn.close()
        if exc_value is not None and not isinstance(exc_value, StorageUnavailable):
            raise_translated(exc_value)


class SqlUnitOfWorkFactory:
    """Makes units of work; `write=True` for use cases that change data.

    Read-only units of work may use a separate autocommit engine: on PostgreSQL that saves the
    BEGIN and ROLLBACK round trips, which cost more than a single-row SELECT.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        read_engine: AsyncEngine | None = None,
        *,
        on_user_events: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine
        # Called after a commit that wrote user events.
        self.on_user_events = on_user_events

    def __call__(self, *, write: bool = True) -> SqlUnitOfWork:
        return SqlUnitOfWork(
            self.engine if write else self.read_engine,
            write=write,
            on_user_events=self.on_user_events,
        )
