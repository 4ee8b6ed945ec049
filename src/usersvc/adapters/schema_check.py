"""Is the database reachable, and is its schema the one this code expects?"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import exc, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine


def describe_url(url: str) -> str:
    """The database URL without its password, for log lines."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True, slots=True)
class SchemaState:
    """None `problem`: ready. Otherwise one line saying what is wrong and what to do."""

    problem: str | None
    revision: str | None = None


async def check_schema(
    engine: AsyncEngine, *, heads: frozenset[str], known: frozenset[str], within: float
) -> SchemaState:
    """Connect, read the Alembic revision and compare it with the code's head.

    A revision this code does not know is newer than it (a rolling upgrade migrated first):
    expand-only migrations keep older code working on it, so that counts as ready. A known
    revision other than the head means the database is behind: not ready.
    """
    where = describe_url(str(engine.url))
    try:
        async with asyncio.timeout(within):
            revisions = await _read_revisions(engine)
    except TimeoutError:
        return _silent(where, within)
    except (exc.DBAPIError, OSError) as err:
        return _unreachable(where, err)
    return _compare(where, revisions, heads=heads, known=known)


class SchemaCheck:
    """check_schema for the readiness loop: it answers within `within` s even when the
    database has stopped answering with connections open (a hang, a network partition).

    Cancelling a read on such a connection does not end it at once: the driver first asks the
    server to cancel the statement and waits for the answer (psycopg: up to 5 + 5 s), so a
    check bounded by cancelling its read would itself hang for that long, and readiness would
    lag the database by it whatever the interval. Here the check stops waiting at `within`
    and leaves the read to end on its own; until it has, later checks start no other read
    (the database still has not answered), so one hung database costs one connection.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        heads: frozenset[str],
        known: frozenset[str],
        within: float,
    ) -> None:
        self._engine = engine
        self._heads = heads
        self._known = known
        self._within = within
        self._where = describe_url(str(engine.url))
        self._read: asyncio.Task[set[str]] | None = None

    async def __call__(self) -> SchemaState:
        if self._read is not None and not self._read.done():
            return _silent(self._where, self._within)
        read = self._read = asyncio.create_task(_read_revisions(self._engine))
        done, _ = await asyncio.wait((read,), timeout=self._within)
        if not done:
            read.cancel()
            read.add_done_callback(_consume)
            return _silent(self._where, self._within)
        try:
            revisions = read.result()
        except (exc.DBAPIError, OSError) as err:
            return _unreachable(self._where, err)
        return _compare(self._where, revisions, heads=self._heads, known=self._known)

    async def close(self) -> None:
        """End a read still in progress (at shutdown)."""
        read, self._read = self._read, None
        if read is not None and not read.done():
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)


def _consume(read: asyncio.Task[set[str]]) -> None:
    # Nobody awaits a read left to end on its own: its error, if any, is not news.
    if not read.cancelled():
        read.exception()


async def _read_revisions(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    return {row[0] for row in rows}


def _silent(where: str, within: float) -> SchemaState:
    return SchemaState(f"database {where} did not answer within {within:g} s")


def _unreachable(where: str, err: exc.DBAPIError | OSError) -> SchemaState:
    if isinstance(err, OSError):
        return SchemaState(f"database {where} is unreachable: {err}")
    message = " ".join(str(err.orig).split())
    lowered = message.lower()
    if "alembic_version" in lowered and ("no such table" in lowered or "does not exist" in lowered):
        return SchemaState(f"database {where} is not migrated ({message}): run usersvc migrate")
    return SchemaState(f"database {where} is unreachable: {message}")


def _compare(
    where: str, revisions: set[str], *, heads: frozenset[str], known: frozenset[str]
) -> SchemaState:
    if not revisions:
        return SchemaState(
            f"database {where} is not migrated (empty alembic_version): run usersvc migrate"
        )
    if revisions & heads or not revisions <= known:
        return SchemaState(None, ",".join(sorted(revisions)))
    return SchemaState(
        f"database {where} is at revision {','.join(sorted(revisions))}, this code needs "
        f"{','.join(sorted(heads))}: run usersvc migrate",
        ",".join(sorted(revisions)),
    )
