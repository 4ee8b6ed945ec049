"""The per-call point reads: when the database cannot be reached, and their round trips."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
from sqlalchemy import text

from tests.support import sync_engine
from usersvc.adapters.point_reads import APPLICATION_NAME, ConnectionLender, PostgresPointReads
from usersvc.domain.errors import StorageUnavailable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_postgresql_is_storage_unavailable() -> None:
    reads = PostgresPointReads(
        f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/usersvc", size=1
    )
    try:
        with pytest.raises(StorageUnavailable):
            await reads.get(uuid.uuid4())
        with pytest.raises(StorageUnavailable):
            await reads.auth_state(uuid.uuid4())
    finally:
        await reads.close()


async def test_a_read_is_one_round_trip_with_no_session_reset(postgres_url: str) -> None:
    """Returning a connection to the pool sends nothing: the last statement each pooled
    connection ran is the read itself, not asyncpg's default reset query."""
    name = _own_name()
    reads = PostgresPointReads(postgres_url, size=1, application_name=name)
    try:
        await reads.get(uuid.uuid4())
        await reads.auth_state(uuid.uuid4())
        engine = sync_engine(postgres_url)
        try:
            with engine.connect() as conn:
                last = (
                    conn.execute(
                        text(
                            "SELECT query FROM pg_stat_activity"
                            " WHERE application_name = :name AND datname = current_database()"
                        ),
                        {"name": name},
                    )
                    .scalars()
                    .all()
                )
        finally:
            engine.dispose()
        assert len(last) == 1, last
        assert "FROM users" in last[0] and "RESET" not in last[0].upper(), last
    finally:
        await reads.close()


def _own_name() -> str:
    """An application_name of this test's own: other tests' servers share the database."""
    return f"{APPLICATION_NAME}-{uuid.uuid4().hex[:12]}"


def _backends(url: str, name: str) -> list[int]:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE application_name = :name AND datname = current_database()"
                    ),
                    {"name": name},
                ).scalars()
            )
    finally:
        engine.dispose()


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


async def test_many_reads_share_at_most_size_connections(postgres_url: str) -> None:
    name = _own_name()
    lender = ConnectionLender(_dsn(postgres_url), size=3, application_name=name)
    try:
        rows = await asyncio.gather(*(lender.fetchrow("SELECT $1::int", n) for n in range(50)))
        assert [row[0] for row in rows if row is not None] == list(range(50))
        assert 1 <= len(_backends(postgres_url, name)) <= 3
    finally:
        await lender.close()
    assert _backends(postgres_url, name) == []


async def test_a_cancelled_read_closes_its_connection_and_the_next_reads_work(
    postgres_url: str,
) -> None:
    lender = ConnectionLender(_dsn(postgres_url), size=1)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await lender.fetchrow("SELECT pg_sleep(30)")
        # The only connection was the cancelled one; waiting callers are served by a new one.
        rows = await asyncio.gather(*(lender.fetchrow("SELECT $1::int", n) for n in range(5)))
        assert [row[0] for row in rows if row is not None] == list(range(5))
    finally:
        await lender.close()


async def test_a_waiter_cancelled_while_queued_does_not_leak_the_connection(
    postgres_url: str,
) -> None:
    lender = ConnectionLender(_dsn(postgres_url), size=1)
    try:
        slow = asyncio.create_task(lender.fetchrow("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await lender.fetchrow("SELECT 1")
        await slow
        row = await asyncio.wait_for(lender.fetchrow("SELECT 2"), 5)
        assert row is not None and row[0] == 2
    finally:
        await lender.close()


async def test_a_waiter_cancelled_after_being_told_to_open_does_not_leak_its_place(
    postgres_url: str,
) -> None:
    """When a lent connection is closed (its read cancelled), the first waiter is told to
    open the replacement; if that waiter is cancelled before it runs (many calls reaching
    their deadlines at once, as while a database hangs), its place must go back to the
    count. Before, it stayed counted: after `size` such races no connection could ever be
    opened again and every read waited until its deadline."""
    lender = ConnectionLender(_dsn(postgres_url), size=1)
    try:
        await lender.fetchrow("SELECT 1")  # the one connection, idle
        holder = asyncio.create_task(lender.fetchrow("SELECT pg_sleep(30)"))
        waiter = asyncio.create_task(lender.fetchrow("SELECT 2"))
        # One turn of the loop: each task runs its first step, in creation order. The holder
        # is lent the connection and sends its statement; the waiter queues.
        await asyncio.sleep(0)
        assert len(lender._waiters) == 1
        holder.cancel()
        # Runs right after the holder's cancellation, which hands the waiter its turn.
        asyncio.get_running_loop().call_soon(waiter.cancel)
        for task in (holder, waiter):
            with pytest.raises(asyncio.CancelledError):
                await task
        row = await asyncio.wait_for(lender.fetchrow("SELECT 3"), 5)
        assert row is not None and row[0] == 3
    finally:
        await lender.close()


async def test_a_connection_the_server_closed_is_replaced_without_an_error(
    postgres_url: str,
) -> None:
    name = _own_name()
    reads = PostgresPointReads(postgres_url, size=2, application_name=name)
    try:
        await asyncio.gather(reads.get(uuid.uuid4()), reads.get(uuid.uuid4()))
        before = _backends(postgres_url, name)
        assert before
        engine = sync_engine(postgres_url)
        try:
            with engine.connect() as conn:
                for pid in before:
                    conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        finally:
            engine.dispose()
        # As after a database restart: the idle connections are dead; reads go on.
        assert await reads.get(uuid.uuid4()) is None
        assert await reads.auth_state(uuid.uuid4()) is None
        assert not set(_backends(postgres_url, name)) & set(before)
    finally:
        await reads.close()
