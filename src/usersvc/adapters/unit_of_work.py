"""Unit of work: one transaction per use case, rolled back unless committed explicitly."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol, Self

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usersvc.adapters.audit_repository import AuditRepository
from usersvc.adapters.db import SQLITE_WRITE, is_sqlite
from usersvc.adapters.idempotency_repository import IdempotencyRepository
from usersvc.adapters.outbox_repository import OutboxRepository
from usersvc.adapters.refresh_token_repository import RefreshTokenRepository
from usersvc.adapters.user_repository import UserRepository
from usersvc.domain.errors import (
    DuplicateRequest,
    EmailTaken,
    RetryableConflict,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

# Serialization failure and deadlock: the transaction may succeed if run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class UnitOfWork(Protocol):
    """What the service layer needs: repositories, commit, rollback-unless-committed."""

    users: UserRepository
    outbox: OutboxRepository
    refresh_tokens: RefreshTokenRepository
    audit: AuditRepository
    idempotency: IdempotencyRepository

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    """Makes a unit of work; `write=False` for read-only use cases."""

    def __call__(self, *, write: bool = True) -> UnitOfWork: ...


def _is_unique_violation(err: exc.IntegrityError) -> bool:
    orig = err.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == "23505")
    return "UNIQUE constraint failed" in str(orig)


def translate_db_error(err: BaseException) -> BaseException:
    """Map driver errors the caller can act on to domain errors; leave the rest alone."""
    if isinstance(err, exc.IntegrityError) and _is_unique_violation(err):
        text = str(err.orig)
        if "idempotency_keys" in text:
            return DuplicateRequest()
        if "email" in text:
            return EmailTaken()
    sqlstate = getattr(getattr(err, "orig", None), "sqlstate", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return RetryableConflict(f"transaction conflict ({sqlstate})")
    if isinstance(err, exc.OperationalError) and "database is locked" in str(err.orig):
        return RetryableConflict("database is locked")
    if isinstance(err, exc.InterfaceError | exc.OperationalError) or (
        isinstance(err, exc.DBAPIError) and err.connection_invalidated
    ):
        sqlstate = getattr(err.orig, "sqlstate", None) or ""
        # Class 08 (connection), 57P (shutdown), 53 (insufficient resources) are transient.
        if not sqlstate or sqlstate.startswith(("08", "57P", "53")):
            log.warning("database unavailable: %s", type(err.orig).__name__)
            return StorageUnavailable()
    if isinstance(err, TimeoutError | OSError | ConnectionError):
        return StorageUnavailable()
    if isinstance(err, exc.DBAPIError):
        return SanitizedDatabaseError.of(err)
    return err


class SanitizedDatabaseError(Exception):
    """An unexpected database error without the server's detail text.

    PostgreSQL's DETAIL repeats the failing row ("Failing row contains (...)"), which may hold
    a password hash; only the primary message, the SQLSTATE and the constraint are kept.
    """

    @classmethod
    def of(cls, err: exc.DBAPIError) -> SanitizedDatabaseError:
        orig = err.orig
        diag = getattr(orig, "diag", None)
        primary = getattr(diag, "message_primary", None) or str(orig).split("\n", 1)[0]
        if diag is None and "Failing row" in primary:  # pragma: no cover - defensive
            primary = primary.split("Failing row", 1)[0]
        parts = [type(orig).__name__, f"sqlstate={getattr(orig, 'sqlstate', None) or '-'}"]
        constraint = getattr(diag, "constraint_name", None)
        if constraint:
            parts.append(f"constraint={constraint}")
        return cls(f"{' '.join(parts)}: {primary}")


def _raise_translated(err: BaseException) -> None:
    translated = translate_db_error(err)
    if translated is err:
        return
    if isinstance(translated, SanitizedDatabaseError):
        # "from None": the original text must not reach a traceback in the log.
        raise translated from None
    raise translated from err


class SqlUnitOfWork:
    """A transaction on one pooled connection, with the repositories bound to it."""

    users: UserRepository
    outbox: OutboxRepository
    refresh_tokens: RefreshTokenRepository
    audit: AuditRepository
    idempotency: IdempotencyRepository

    def __init__(self, engine: AsyncEngine, *, write: bool) -> None:
        self._engine = engine
        self._write = write
        self._conn: AsyncConnection | None = None
        self._committed = False

    async def __aenter__(self) -> Self:
        try:
            conn = await self._engine.connect()
            if self._write and is_sqlite(self._engine):
                await conn.execution_options(**{SQLITE_WRITE: True})
            await conn.begin()
        except Exception as err:
            _raise_translated(err)
            raise
        self._conn = conn
        self.users = UserRepository(conn)
        self.outbox = OutboxRepository(conn)
        self.refresh_tokens = RefreshTokenRepository(conn)
        self.audit = AuditRepository(conn)
        self.idempotency = IdempotencyRepository(conn)
        return self

    async def commit(self) -> None:
        assert self._conn is not None
        try:
            await self._conn.commit()
        except Exception as err:
            _raise_translated(err)
            raise
        self._committed = True

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
            _raise_translated(exc_value)


class SqlUnitOfWorkFactory:
    """Makes units of work; `write=True` for use cases that change data.

    Read-only units of work may use a separate autocommit engine: on PostgreSQL that saves the
    BEGIN and ROLLBACK round trips, which cost more than a single-row SELECT.
    """

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine

    def __call__(self, *, write: bool = True) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.engine if write else self.read_engine, write=write)
