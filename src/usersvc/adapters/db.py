"""Engine creation: PostgreSQL through psycopg 3, SQLite through aiosqlite."""

from __future__ import annotations

import select
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Execution option that makes a SQLite transaction take the write lock at BEGIN, so two
# writers queue on busy_timeout instead of failing with "database is locked" on upgrade.
SQLITE_WRITE = "usersvc_sqlite_write"


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine for `url` holding at most `pool_size` connections (no overflow); SQLite gets
    WAL, a busy timeout, foreign keys and BEGIN IMMEDIATE.

    hide_parameters: a database error's text must never carry a password hash or a token
    hash into a log line.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(
                url, pool_size=pool_size, max_overflow=0, hide_parameters=True
            )
        else:
            # In-memory databases live in one connection: SQLAlchemy picks a static pool.
            engine = create_async_engine(url, hide_parameters=True)
        _configure_sqlite(engine)
        return engine
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=False,
        pool_recycle=1800,
        hide_parameters=True,
    )
    drop_connections_closed_by_the_server(engine)
    return engine


def drop_connections_closed_by_the_server(engine: AsyncEngine) -> None:
    """Check each PostgreSQL connection as it leaves the pool: without a round trip, by
    whether its socket has anything to read. An idle connection's socket has nothing, unless
    the server closed it (a restart or failover: the server says goodbye, or the socket is
    at its end). Such a connection is replaced before the caller gets it, where it would
    otherwise fail the first call after every restart once per pool. (pool_pre_ping would
    cost a round trip on every checkout; a database that hangs is the deadlines' business.)
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if _closed_by_server(dbapi_connection):
            # The pool invalidates this connection and checks out another (SQLAlchemy's
            # documented way for a checkout handler to refuse a connection).
            raise exc.DisconnectionError("the server closed this connection")


def _closed_by_server(dbapi_connection: Any) -> bool:
    conn = getattr(dbapi_connection, "driver_connection", None)
    if conn is None:
        return False
    if conn.closed:
        return True
    if not hasattr(select, "poll"):  # pragma: no cover - Windows: no check, as before
        return False
    try:
        # poll, not select: a busy server's descriptors go past select's limit of 1024.
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except OSError:
        return True


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front; readers run each statement on its own
        # (autocommit), which saves two trips through aiosqlite's thread per read.
        if conn.get_execution_options().get(SQLITE_WRITE, False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_read_engine(url: str, *, pool_size: int = 10) -> AsyncEngine | None:
    """An autocommit engine for single-statement reads on PostgreSQL; None for SQLite.

    Its own pool: switching the isolation level per checkout costs more than it saves.
    """
    if make_url(url).get_backend_name() == "sqlite":
        return None
    engine = create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_recycle=1800,
        isolation_level="AUTOCOMMIT",
        hide_parameters=True,
    )
    drop_connections_closed_by_the_server(engine)
    return engine
