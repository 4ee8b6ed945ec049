"""OneTimeCodeRepository: the SQL of the one_time_codes table."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Row, case, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.tables import one_time_codes
from usersvc.domain.one_time_codes import CodePurpose, OneTimeCode

_T = one_time_codes


def _to_code(row: Row[object]) -> OneTimeCode:
    m = row._mapping
    return OneTimeCode(
        id=m["id"],
        user_id=m["user_id"],
        purpose=CodePurpose(m["purpose"]),
        code_hash=m["code_hash"],
        email=m["email"],
        create_time=m["create_time"],
        expire_time=m["expire_time"],
        used_time=m["used_time"],
        failed_attempts=m["failed_attempts"],
    )


class OneTimeCodeRepository:
    """Codes by hash on one connection (the unit of work's)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, code: OneTimeCode) -> None:
        await self._conn.execute(
            insert(_T).values(
                id=code.id,
                user_id=code.user_id,
                purpose=code.purpose.value,
                code_hash=code.code_hash,
                email=code.email,
                failed_attempts=code.failed_attempts,
                create_time=code.create_time,
                expire_time=code.expire_time,
                used_time=code.used_time,
            )
        )

    async def supersede(self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime) -> int:
        result = await self._conn.execute(
            update(_T)
            .where(_T.c.user_id == user_id, _T.c.purpose == purpose.value)
            .where(_T.c.used_time.is_(None))
            .values(used_time=now)
        )
        return int(result.rowcount)

    async def redeem(
        self,
        user_id: uuid.UUID,
        purpose: CodePurpose,
        code_hash: str,
        *,
        now: datetime,
        max_attempts: int,
    ) -> OneTimeCode | None:
        """One conditional UPDATE: on PostgreSQL a concurrent redeem waits for the row lock,
        then finds used_time set and matches nothing; SQLite runs write transactions one at a
        time."""
        stmt = (
            update(_T)
            .where(_T.c.code_hash == code_hash)
            .where(_T.c.user_id == user_id, _T.c.purpose == purpose.value)
            .where(_T.c.used_time.is_(None), _T.c.expire_time > now)
            .where(_T.c.failed_attempts < max_attempts)
            .values(used_time=now)
            .returning(*_T.c)
        )
        row = (await self._conn.execute(stmt)).first()
        if row is None:
            return None
        redeemed = _to_code(row)
        # RETURNING gives the new values; the caller gets the code as it was.
        return OneTimeCode(
            id=redeemed.id,
            user_id=redeemed.user_id,
            purpose=redeemed.purpose,
            code_hash=redeemed.code_hash,
            email=redeemed.email,
            create_time=redeemed.create_time,
            expire_time=redeemed.expire_time,
            used_time=None,
            failed_attempts=redeemed.failed_attempts,
        )

    async def record_failure(
        self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime, max_attempts: int
    ) -> None:
        await self._conn.execute(
            update(_T)
            .where(_T.c.user_id == user_id, _T.c.purpose == purpose.value)
            .where(_T.c.used_time.is_(None))
            .values(
                failed_attempts=_T.c.failed_attempts + 1,
                used_time=case((_T.c.failed_attempts + 1 >= max_attempts, now), else_=None),
            )
        )
