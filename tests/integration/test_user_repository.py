"""UserRepository and SqlUnitOfWork on real databases (SQLite and PostgreSQL).

The database is shared by the whole session, so every test makes its own rows (unique
emails and ids) and never assumes the table is empty.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine

from tests.support import sync_engine
from usersvc.adapters.db import create_engine
from usersvc.adapters.tables import users
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain.errors import EmailTaken
from usersvc.domain.models import PageCursor, User, UserState
from usersvc.domain.user_filter import UserFilter

FAR_FUTURE = datetime(2300, 1, 1, tzinfo=UTC)


@pytest.fixture
async def uow(database_url: str) -> AsyncIterator[SqlUnitOfWorkFactory]:
    """A unit-of-work factory on an engine made for this test alone and disposed after it."""
    engine = create_engine(database_url, pool_size=5)
    try:
        yield SqlUnitOfWorkFactory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """A synchronous engine on the same database, to check what is really stored."""
    engine = sync_engine(database_url)
    yield engine
    engine.dispose()


def _is_sqlite(database_url: str) -> bool:
    return database_url.startswith("sqlite")


def new_user(**overrides: Any) -> User:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email": f"{uuid.uuid4().hex}@example.com",
        "name": "Repository Test",
        "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$not-a-real-hash",
        "roles": (),
        "state": UserState.ACTIVE,
        "create_time": now,
        "update_time": now,
        "version": 1,
    }
    values.update(overrides)
    return User(**values)


async def _insert(uow: SqlUnitOfWorkFactory, *rows: User) -> None:
    async with uow() as tx:
        for row in rows:
            await tx.users.add(row)
        await tx.commit()


async def _read(uow: SqlUnitOfWorkFactory, user_id: uuid.UUID) -> User | None:
    async with uow(write=False) as tx:
        return await tx.users.get(user_id)


def _count_ids(db: Engine, *ids: uuid.UUID) -> int:
    with db.connect() as conn:
        stmt = select(func.count()).select_from(users).where(users.c.id.in_(ids))
        return int(conn.execute(stmt).scalar_one())


# --- round trip ------------------------------------------------------------------------------


async def test_add_then_get_and_get_by_email_give_the_same_user(
    uow: SqlUnitOfWorkFactory,
) -> None:
    user = new_user(
        roles=("admin", "service"),
        state=UserState.DISABLED,
        create_time=datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=UTC),
        update_time=datetime(2031, 2, 3, 4, 5, 7, 1, tzinfo=UTC),
        version=3,
    )
    await _insert(uow, user)
    async with uow(write=False) as tx:
        by_id = await tx.users.get(user.id)
        by_email = await tx.users.get_by_email(user.email)
    assert by_id == user
    assert by_email == user
    assert by_id is not None
    for value in (by_id.create_time, by_id.update_time):
        assert value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)
    assert by_id.create_time.microsecond == 789012


async def test_datetimes_in_another_zone_come_back_as_the_same_instant_in_utc(
    uow: SqlUnitOfWorkFactory,
) -> None:
    local = datetime(2031, 6, 1, 14, 30, 0, 250000, tzinfo=timezone(timedelta(hours=-7)))
    user = new_user(create_time=local, update_time=local)
    await _insert(uow, user)
    stored = await _read(uow, user.id)
    assert stored is not None
    assert stored.create_time == local
    assert stored.create_time.utcoffset() == timedelta(0)
    assert stored.create_time.hour == 21


async def test_get_of_unknown_id_or_email_is_none(uow: SqlUnitOfWorkFactory) -> None:
    async with uow(write=False) as tx:
        assert await tx.users.get(uuid.uuid4()) is None
        assert await tx.users.get_by_email(f"{uuid.uuid4().hex}@example.com") is None


# --- unique email ----------------------------------------------------------------------------


async def test_duplicate_email_raises_email_taken_from_the_unit_of_work(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    first = new_user(name="First")
    await _insert(uow, first)
    second = new_user(email=first.email, name="Second")
    with pytest.raises(EmailTaken):
        await _insert(uow, second)
    assert _count_ids(db, second.id) == 0
    stored = await _read(uow, first.id)
    assert stored == first


async def test_a_failed_insert_takes_the_rest_of_its_unit_of_work_with_it(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    taken = new_user()
    await _insert(uow, taken)
    innocent = new_user()
    with pytest.raises(EmailTaken):
        await _insert(uow, innocent, new_user(email=taken.email))
    assert _count_ids(db, innocent.id) == 0


# --- update ----------------------------------------------------------------------------------


async def test_update_with_the_matching_version_bumps_the_version(
    uow: SqlUnitOfWorkFactory,
) -> None:
    user = new_user()
    await _insert(uow, user)
    later = user.update_time + timedelta(seconds=5)
    async with uow() as tx:
        updated = await tx.users.update(
            user.id, {"name": "Renamed", "update_time": later}, expected_version=1
        )
        await tx.commit()
    assert updated is not None
    assert (updated.name, updated.version, updated.update_time) == ("Renamed", 2, later)
    assert updated.create_time == user.create_time
    assert await _read(uow, user.id) == updated


async def test_update_with_a_stale_version_returns_none_and_changes_nothing(
    uow: SqlUnitOfWorkFactory,
) -> None:
    user = new_user()
    await _insert(uow, user)
    async with uow() as tx:
        current = await tx.users.update(user.id, {"name": "Second"}, expected_version=1)
        await tx.commit()
    async with uow() as tx:
        stale = await tx.users.update(user.id, {"name": "Lost"}, expected_version=1)
        await tx.commit()
    assert stale is None
    assert current is not None
    assert await _read(uow, user.id) == current


async def test_update_without_a_version_always_applies(uow: SqlUnitOfWorkFactory) -> None:
    user = new_user(version=7)
    await _insert(uow, user)
    async with uow() as tx:
        updated = await tx.users.update(user.id, {"roles": ["admin"]})
        await tx.commit()
    assert updated is not None
    assert (updated.roles, updated.version) == (("admin",), 8)


async def test_update_of_an_unknown_id_returns_none(uow: SqlUnitOfWorkFactory) -> None:
    async with uow() as tx:
        assert await tx.users.update(uuid.uuid4(), {"name": "Nobody"}) is None


@pytest.mark.parametrize(
    "values",
    [
        {"version": 99},
        {"id": uuid.uuid4()},
        {"create_time": datetime(2000, 1, 1, tzinfo=UTC)},
        {"name": "ok", "email; DROP TABLE users; --": "x"},
    ],
)
async def test_update_of_a_column_that_is_not_writable_raises_value_error(
    uow: SqlUnitOfWorkFactory, values: dict[str, Any]
) -> None:
    user = new_user()
    await _insert(uow, user)

    async def write() -> None:
        async with uow() as tx:
            await tx.users.update(user.id, values)
            await tx.commit()

    with pytest.raises(ValueError, match="not writable"):
        await write()
    assert await _read(uow, user.id) == user


# --- delete ----------------------------------------------------------------------------------


async def test_delete_with_a_stale_version_keeps_the_row(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user = new_user(version=2)
    await _insert(uow, user)
    async with uow() as tx:
        assert await tx.users.delete(user.id, expected_version=1) is False
        await tx.commit()
    assert _count_ids(db, user.id) == 1


async def test_delete_with_the_matching_version_removes_the_row(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user = new_user(version=2)
    await _insert(uow, user)
    async with uow() as tx:
        assert await tx.users.delete(user.id, expected_version=2) is True
        await tx.commit()
    assert _count_ids(db, user.id) == 0


async def test_delete_without_a_version_removes_the_row_once(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user, other = new_user(), new_user()
    await _insert(uow, user, other)
    async with uow() as tx:
        assert await tx.users.delete(user.id) is True
        await tx.commit()
    async with uow() as tx:
        assert await tx.users.delete(user.id) is False
    assert _count_ids(db, user.id) == 0
    assert _count_ids(db, other.id) == 1


# --- transactions ----------------------------------------------------------------------------


async def test_a_unit_of_work_left_without_commit_leaves_no_row(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user = new_user()
    async with uow() as tx:
        await tx.users.add(user)
        assert await tx.users.get(user.id) == user  # visible inside its own transaction
    assert _count_ids(db, user.id) == 0
    assert await _read(uow, user.id) is None


async def test_a_unit_of_work_left_by_an_exception_is_rolled_back(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user = new_user()
    await _insert(uow, user)
    added = new_user()

    class Boom(Exception):
        pass

    async def fail_halfway() -> None:
        async with uow() as tx:
            await tx.users.add(added)
            await tx.users.update(user.id, {"name": "Changed"})
            await tx.users.delete(user.id)
            raise Boom

    with pytest.raises(Boom):
        await fail_halfway()
    assert _count_ids(db, added.id) == 0
    assert await _read(uow, user.id) == user


async def test_changes_after_a_commit_need_their_own_commit(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    kept, dropped = new_user(), new_user()
    async with uow() as tx:
        await tx.users.add(kept)
        await tx.commit()
        await tx.users.add(dropped)
    assert _count_ids(db, kept.id) == 1
    assert _count_ids(db, dropped.id) == 0


async def test_twenty_concurrent_write_units_of_work_all_commit(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    """Each reads before it writes: with a deferred BEGIN, SQLite would refuse the upgrade of
    a stale read snapshot with "database is locked" at once instead of waiting its turn."""
    batch = [new_user() for _ in range(20)]

    async def create(user: User) -> None:
        async with uow() as tx:
            assert await tx.users.get_by_email(user.email) is None
            await asyncio.sleep(0)  # let the others start their transactions
            await tx.users.add(user)
            await asyncio.sleep(0)
            await tx.commit()

    await asyncio.gather(*(create(user) for user in batch))
    assert _count_ids(db, *(u.id for u in batch)) == 20


# --- list order ------------------------------------------------------------------------------


def _id_starting_with(first_byte: int) -> uuid.UUID:
    return uuid.UUID(bytes=bytes([first_byte]) + uuid.uuid4().bytes[1:])


@pytest.fixture
def newest_time(db: Engine) -> datetime:
    """A create_time later than any row in the table, in the far future so no real row wins."""
    with db.connect() as conn:
        latest = conn.execute(select(func.max(users.c.create_time))).scalar_one_or_none()
    base = max(FAR_FUTURE, latest or FAR_FUTURE) + timedelta(days=1)
    return base + timedelta(microseconds=random.randrange(1, 10**6))


@pytest.fixture
def far_future_rows(db: Engine) -> Iterator[list[uuid.UUID]]:
    """Ids of rows a test puts in the far future; deleted afterwards so later lists are not
    topped by them."""
    ids: list[uuid.UUID] = []
    yield ids
    if ids:
        with db.begin() as conn:
            conn.execute(delete(users).where(users.c.id.in_(ids)))


async def test_list_is_newest_first_with_ties_broken_by_id_descending(
    uow: SqlUnitOfWorkFactory, newest_time: datetime, far_future_rows: list[uuid.UUID]
) -> None:
    t = newest_time
    tied = [
        new_user(id=_id_starting_with(b), create_time=t, update_time=t)
        for b in (0x00, 0x7F, 0x80, 0xFF, 0x0A, 0xA0)  # bytes that expose signed or text order
    ]
    older = [
        new_user(create_time=t - timedelta(microseconds=1), update_time=t),
        new_user(create_time=t - timedelta(seconds=1), update_time=t),
    ]
    newest = new_user(create_time=t + timedelta(microseconds=1), update_time=t)
    mine = [*tied, *older, newest]
    far_future_rows.extend(u.id for u in mine)
    random.shuffle(mine)  # insertion order must not matter
    await _insert(uow, *mine)

    expected = [newest, *sorted(tied, key=lambda u: u.id, reverse=True), *older]
    async with uow(write=False) as tx:
        first_rows = await tx.users.list(limit=len(expected), after=None, where=UserFilter())
    assert [u.id for u in first_rows] == [u.id for u in expected]
    assert first_rows[1].create_time == t


async def test_list_after_a_cursor_continues_inside_a_tie(
    uow: SqlUnitOfWorkFactory, newest_time: datetime, far_future_rows: list[uuid.UUID]
) -> None:
    t = newest_time
    mine = [new_user(id=_id_starting_with(b), create_time=t, update_time=t) for b in range(6)]
    mine.append(new_user(create_time=t - timedelta(microseconds=1), update_time=t))
    far_future_rows.extend(u.id for u in mine)
    await _insert(uow, *mine)
    expected = sorted(mine, key=lambda u: (u.create_time, u.id), reverse=True)

    pages: list[list[uuid.UUID]] = []
    after: PageCursor | None = None
    async with uow(write=False) as tx:
        for _ in range(3):
            page = await tx.users.list(limit=3, after=after, where=UserFilter())
            pages.append([u.id for u in page])
            after = PageCursor(create_time=page[-1].create_time, id=page[-1].id)
    ids = [u.id for u in expected]
    assert pages[0] == ids[0:3]
    assert pages[1] == ids[3:6]
    assert pages[2][0] == ids[6]  # then rows older than this test's, whatever they are


async def test_list_and_count_filter_by_exact_email(uow: SqlUnitOfWorkFactory) -> None:
    user, other = new_user(), new_user()
    await _insert(uow, user, other)
    async with uow(write=False) as tx:
        found = await tx.users.list(limit=10, after=None, where=UserFilter(email=user.email))
        assert [u.id for u in found] == [user.id]
        assert await tx.users.count(where=UserFilter(email=user.email)) == 1
        missing = UserFilter(email=f"{uuid.uuid4().hex}@example.com")
        assert await tx.users.count(where=missing) == 0
        assert await tx.users.count(where=UserFilter()) >= 2


# --- engine ----------------------------------------------------------------------------------


async def test_an_in_memory_sqlite_engine_can_be_created() -> None:
    engine = create_engine("sqlite+aiosqlite:///:memory:")
    await engine.dispose()
