"""OutboxRepository: writes outbox rows inside the caller's transaction."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.tables import outbox
from usersvc.domain.events import OutboxMessage

_INSERT = insert(outbox)


class OutboxRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, message: OutboxMessage) -> None:
        await self._conn.execute(
            _INSERT,
            {
                "id": message.id,
                "topic": message.topic,
                "aggregate_id": message.aggregate_id,
                "payload": message.payload,
                "request_id": message.request_id,
                "status": "pending",
                "attempts": 0,
                "next_attempt_time": message.create_time,
                "claimed_until": None,
                "last_error": None,
                "create_time": message.create_time,
                "update_time": message.create_time,
            },
        )
