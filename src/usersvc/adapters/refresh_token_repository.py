"""RefreshTokenRepository: refresh tokens by hash, rotation and family revocation."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.tables import refresh_tokens
from usersvc.domain.records import RefreshTokenRecord, RefreshTokenStatus

ACTIVE, USED, REVOKED = (
    RefreshTokenStatus.ACTIVE.value,
    RefreshTokenStatus.USED.value,
    RefreshTokenStatus.REVOKED.value,
)

_GET_BY_HASH = select(refresh_tokens).where(refresh_tokens.c.token_hash == bindparam("h"))


class RefreshTokenRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(
        self,
        *,
        token_hash: str,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        now: datetime,
        expire_time: datetime,
    ) -> None:
        await self._conn.execute(
            insert(refresh_tokens),
            {
                "id": uuid.uuid4(),
                "token_hash": token_hash,
                "user_id": user_id,
                "family_id": family_id,
                "status": ACTIVE,
                "create_time": now,
                "expire_time": expire_time,
            },
        )

    async def get_by_hash(self, token_hash: str) -> RefreshTokenRecord | None:
        row = (await self._conn.execute(_GET_BY_HASH, {"h": token_hash})).first()
        if row is None:
            return None
        m = row._mapping
        return RefreshTokenRecord(
            id=m["id"],
            user_id=m["user_id"],
            family_id=m["family_id"],
            status=RefreshTokenStatus(m["status"]),
            expire_time=m["expire_time"],
        )

    async def mark_used(self, token_id: uuid.UUID) -> bool:
        """Atomically move an active token to used; False if it was not active any more."""
        result = await self._conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.id == token_id, refresh_tokens.c.status == ACTIVE)
            .values(status=USED)
        )
        return bool(result.rowcount)

    async def revoke_family(self, family_id: uuid.UUID) -> None:
        await self._conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.family_id == family_id, refresh_tokens.c.status != REVOKED)
            .values(status=REVOKED)
        )

    async def revoke_user(self, user_id: uuid.UUID) -> None:
        await self._conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.user_id == user_id, refresh_tokens.c.status != REVOKED)
            .values(status=REVOKED)
        )
