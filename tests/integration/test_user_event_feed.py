"""The change feed's storage on real databases: out-of-order commits, rollbacks, purges."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import throwaway_database, throwaway_sqlite
from usersvc.adapters.db import create_engine, create_read_engine
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.adapters.user_event_repository import (
    PostgresUserEventSource,
    SqliteUserEventSource,
)
from usersvc.domain import user_events
from usersvc.domain.models import UserState, UserView
from usersvc.domain.user_events import UserChange

NOW = datetime.now(UTC)


def change(name: str, *, at: datetime = NOW) -> UserChange:
    user = UserView(
        id=uuid.uuid4(),
        email=f"{name}@example.com",
        name=name,
        roles=(),
        state=UserState.ACTIVE,
        create_time=at,
        update_time=at,
        version=1,
    )
    return UserChange(
        type=user_events.CREATED,
        user=user,
        changed_fields=("email", "name"),
        request_id=name,
        create_time=at,
    )


@pytest.fixture(scope="module")
def pg_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of its own: these tests reason about the sequence's numbers."""
    with throwaway_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[tuple[SqlUnitOfWorkFactory, PostgresUserEventSource]]:
    engine = create_engine(pg_url, pool_size=4)
    read = create_read_engine(pg_url, pool_size=2)
    assert read is not None
    try:
        yield SqlUnitOfWorkFactory(engine), PostgresUserEventSource(read)
    finally:
        await engine.dispose()
        await read.dispose()


async def test_an_event_is_not_delivered_before_an_earlier_one_still_in_flight(
    pg: tuple[SqlUnitOfWorkFactory, PostgresUserEventSource],
) -> None:
    uow, source = pg
    cursor = source.cursor(await source.head())
    start = cursor.position
    async with uow() as first:
        await first.user_events.add(change("first"))  # takes start + 1, stays open
        async with uow() as second:
            await second.user_events.add(change("second"))  # takes start + 2
            await second.commit()
        # The second is committed, but the first may still commit before it: nothing yet,
        # however often the reader looks.
        for _ in range(3):
            assert await cursor.next_batch(10) == []
        assert cursor.position == start
        await first.commit()
    batch = await cursor.next_batch(10)
    assert [(e.position, e.change.request_id) for e in batch] == [
        (start + 1, "first"),
        (start + 2, "second"),
    ]
    assert await cursor.next_batch(10) == []


async def test_a_rolled_back_number_is_passed_over_once_settled(
    pg: tuple[SqlUnitOfWorkFactory, PostgresUserEventSource],
) -> None:
    uow, source = pg
    cursor = source.cursor(await source.head())
    start = cursor.position
    async with uow() as lost:
        await lost.user_events.add(change("lost"))  # start + 1, never committed
        async with uow() as kept:
            await kept.user_events.add(change("kept"))
            await kept.commit()
        assert await cursor.next_batch(10) == []
    # Rolled back: the gap is final once no transaction that was in flight remains.
    for _ in range(50):
        batch = await cursor.next_batch(10)
        if batch:
            break
    assert [(e.position, e.change.request_id) for e in batch] == [(start + 2, "kept")]


async def test_a_gapless_run_is_delivered_while_a_later_transaction_is_open(
    pg: tuple[SqlUnitOfWorkFactory, PostgresUserEventSource],
) -> None:
    uow, source = pg
    cursor = source.cursor(await source.head())
    start = cursor.position
    async with uow() as done:
        await done.user_events.add(change("done"))
        await done.commit()
    async with uow() as open_tx:
        await open_tx.user_events.add(change("open"))
        batch = await cursor.next_batch(10)
        assert [(e.position, e.change.request_id) for e in batch] == [(start + 1, "done")]
        await open_tx.commit()
    assert [e.change.request_id for e in await cursor.next_batch(10)] == ["open"]


async def test_batches_are_bounded_and_continue_where_they_stopped(
    pg: tuple[SqlUnitOfWorkFactory, PostgresUserEventSource],
) -> None:
    uow, source = pg
    cursor = source.cursor(await source.head())
    for i in range(5):
        async with uow() as tx:
            await tx.user_events.add(change(f"n{i}"))
            await tx.commit()
    seen = [e.change.request_id for e in await cursor.next_batch(2)]
    seen += [e.change.request_id for e in await cursor.next_batch(2)]
    seen += [e.change.request_id for e in await cursor.next_batch(2)]
    assert seen == [f"n{i}" for i in range(5)]


@pytest.fixture(scope="module")
def sqlite_feed_url() -> Iterator[str]:
    with throwaway_sqlite() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_backend(
    request: pytest.FixtureRequest, sqlite_feed_url: str, pg_url: str
) -> AsyncIterator[tuple[SqlUnitOfWorkFactory, SqliteUserEventSource | PostgresUserEventSource]]:
    postgres = request.param == "postgresql"
    engine = create_engine(pg_url if postgres else sqlite_feed_url, pool_size=2)
    source = PostgresUserEventSource(engine) if postgres else SqliteUserEventSource(engine)
    try:
        yield SqlUnitOfWorkFactory(engine), source
    finally:
        await engine.dispose()


async def test_purge_removes_old_events_and_numbers_are_never_reused(
    any_backend: tuple[SqlUnitOfWorkFactory, SqliteUserEventSource | PostgresUserEventSource],
) -> None:
    uow, source = any_backend
    old = NOW - timedelta(days=8)
    async with uow() as tx:
        await tx.user_events.add(change("old", at=old))
        await tx.commit()
    head = await source.head()
    assert await source.purge_older_than(NOW - timedelta(days=7)) >= 1
    # The newest row is gone; the next one still gets a larger number (SQLite AUTOINCREMENT).
    async with uow() as tx:
        await tx.user_events.add(change("new"))
        await tx.commit()
    batch = await source.cursor(head).next_batch(10)
    assert [(e.change.request_id, e.position > head) for e in batch] == [("new", True)]
    assert batch[0].change.user.name == "new"
    assert batch[0].change.create_time.tzinfo is not None
