"""IdempotencyRepository: remembered results of CreateUser calls that carried a request_id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.tables import idempotency_keys
from usersvc.domain.records import IdempotencyRecord

k = idempotency_keys.c


class IdempotencyRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def get(self, *, caller: str, request_id: str) -> IdempotencyRecord | None:
        row = (
            await self._conn.execute(
                select(k.fingerprint, k.result, k.create_time).where(
                    k.caller == caller, k.request_id == request_id
                )
            )
        ).first()
        if row is None:
            return None
        return IdempotencyRecord(fingerprint=row[0], result=row[1], create_time=row[2])

    async def add(
        self,
        *,
        caller: str,
        request_id: str,
        fingerprint: str,
        result: dict[str, Any],
        now: datetime,
    ) -> None:
        """Insert; a concurrent insert of the same key fails with a unique violation."""
        await self._conn.execute(
            insert(idempotency_keys),
            {
                "caller": caller,
                "request_id": request_id,
                "fingerprint": fingerprint,
                "result": result,
                "create_time": now,
            },
        )

    async def delete_expired(self, *, caller: str, request_id: str, cutoff: datetime) -> None:
        """Forget one key if it is past retention, so that it can be used afresh."""
        await self._conn.execute(
            delete(idempotency_keys).where(
                k.caller == caller, k.request_id == request_id, k.create_time < cutoff
            )
        )

    async def purge_older_than(self, cutoff: datetime) -> int:
        result = await self._conn.execute(delete(idempotency_keys).where(k.create_time < cutoff))
        return int(result.rowcount)
