"""The same store tests over the unit-test fakes and both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.fakes import FakeUnitOfWorkFactory
from usersvc.adapters.db import create_engine
from usersvc.adapters.point_reads import PostgresPointReads, SqlitePointReads
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.services.point_reads import UnitOfWorkPointReads
from usersvc.services.ports import UnitOfWorkFactory, UserPointReads

STORES = ("fake", "sqlite", "postgresql")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    """ "fake", or the URL of a migrated session database (made outside any event loop)."""
    if request.param == "fake":
        return "fake"
    name = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[UnitOfWorkFactory]:
    """A unit-of-work factory: the in-memory fake, or SQL on a session database.

    The databases are shared by the session, so every test makes its own rows (unique ids,
    e-mails, topics, far-away times) and never assumes a table is empty.
    """
    if store_url == "fake":
        yield FakeUnitOfWorkFactory()
        return
    engine = create_engine(store_url, pool_size=2)
    try:
        yield SqlUnitOfWorkFactory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def point_reads(store_url: str, stores: UnitOfWorkFactory) -> AsyncIterator[UserPointReads]:
    """The per-call reads the server wires for this store (see bootstrap.create_point_reads)."""
    if store_url == "fake":
        yield UnitOfWorkPointReads(stores)
        return
    reads: PostgresPointReads | SqlitePointReads
    if store_url.startswith("postgresql"):
        reads = PostgresPointReads(store_url, size=1)
    else:
        path = Path(store_url.split("///", 1)[1])
        reads = SqlitePointReads(path, fallback=UnitOfWorkPointReads(stores))
    try:
        yield reads
    finally:
        await reads.close()
