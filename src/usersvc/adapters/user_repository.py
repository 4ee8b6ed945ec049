"""UserRepository: the only place that knows the SQL of the users table."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.tables import users
from usersvc.domain.models import PageCursor, User, UserState

# Statements built once; SQLAlchemy caches their compiled form.
_GET_BY_ID = select(users).where(users.c.id == bindparam("id"))
_GET_BY_EMAIL = select(users).where(users.c.email == bindparam("email"))
_INSERT = insert(users)
_ORDER = (users.c.create_time.desc(), users.c.id.desc())

# Columns an update may write; anything else is a programming error, never request data.
WRITABLE_COLUMNS = frozenset({"email", "name", "password_hash", "roles", "state", "update_time"})


def _to_user(row: Row[Any]) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        email=m["email"],
        name=m["name"],
        password_hash=m["password_hash"],
        roles=tuple(m["roles"]),
        state=UserState(m["state"]),
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


class UserRepository:
    """Reads and writes users on one connection (the unit of work's)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, user: User) -> None:
        await self._conn.execute(
            _INSERT,
            {
                "id": user.id,
                "email": user.email,
                "name": user.name,
                "password_hash": user.password_hash,
                "roles": list(user.roles),
                "state": user.state.value,
                "create_time": user.create_time,
                "update_time": user.update_time,
                "version": user.version,
            },
        )

    async def get(self, user_id: uuid.UUID) -> User | None:
        row = (await self._conn.execute(_GET_BY_ID, {"id": user_id})).first()
        return _to_user(row) if row is not None else None

    async def get_by_email(self, email: str) -> User | None:
        row = (await self._conn.execute(_GET_BY_EMAIL, {"email": email})).first()
        return _to_user(row) if row is not None else None

    async def list(
        self, *, limit: int, after: PageCursor | None, email: str | None
    ) -> Sequence[User]:
        """Up to `limit` users in list order, strictly after `after` (keyset, no OFFSET)."""
        stmt = select(users).order_by(*_ORDER).limit(limit)
        if email is not None:
            stmt = stmt.where(users.c.email == email)
        if after is not None:
            stmt = stmt.where(
                tuple_(users.c.create_time, users.c.id) < tuple_(after.create_time, after.id)
            )
        rows = (await self._conn.execute(stmt)).all()
        return [_to_user(r) for r in rows]

    async def count(self, *, email: str | None) -> int:
        stmt = select(func.count()).select_from(users)
        if email is not None:
            stmt = stmt.where(users.c.email == email)
        return int((await self._conn.execute(stmt)).scalar_one())

    async def update(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
    ) -> User | None:
        """Apply `values` and bump the version in one statement.

        With `expected_version`, the row changes only if its version still matches: the
        check and the write are one atomic UPDATE. None when no row matched.
        """
        unknown = set(values) - WRITABLE_COLUMNS
        if unknown:
            raise ValueError(f"not writable: {sorted(unknown)}")
        stmt = update(users).where(users.c.id == user_id)
        if expected_version is not None:
            stmt = stmt.where(users.c.version == expected_version)
        stmt = stmt.values(**values, version=users.c.version + 1).returning(*users.c)
        row = (await self._conn.execute(stmt)).first()
        return _to_user(row) if row is not None else None

    async def delete(self, user_id: uuid.UUID, *, expected_version: int | None = None) -> bool:
        stmt = delete(users).where(users.c.id == user_id)
        if expected_version is not None:
            stmt = stmt.where(users.c.version == expected_version)
        result = await self._conn.execute(stmt)
        return bool(result.rowcount)
