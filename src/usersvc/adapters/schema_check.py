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
            async with engine.connect() as conn:
                rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except TimeoutError:
        return SchemaState(f"database {where} did not answer within {within:g} s")
    except exc.DBAPIError as err:
        message = " ".join(str(err.orig).split())
        lowered = message.lower()
        if "alembic_version" in lowered and (
            "no such table" in lowered or "does not exist" in lowered
        ):
            return SchemaState(f"database {where} is not migrated ({message}): run usersvc migrate")
        return SchemaState(f"database {where} is unreachable: {message}")
    except OSError as err:
        return SchemaState(f"database {where} is unreachable: {err}")
    revisions = {row[0] for row in rows}
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
