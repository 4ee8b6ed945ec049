"""AuditRepository: append and read audit events; it has no update or delete on purpose."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.bulk_insert import insert_rows
from usersvc.adapters.tables import audit_events
from usersvc.domain.audit import AuditEvent
from usersvc.domain.models import PageCursor

_INSERT = insert(audit_events)


def _row(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "user_id": event.user_id,
        "action": event.action,
        "changes": event.changes,
        "actor": event.actor,
        "request_id": event.request_id,
        "create_time": event.create_time,
    }


class AuditRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, event: AuditEvent) -> None:
        await self._conn.execute(_INSERT, _row(event))

    async def add_many(self, events: Sequence[AuditEvent]) -> None:
        """One COPY on PostgreSQL, one executemany elsewhere."""
        await insert_rows(self._conn, audit_events, [_row(e) for e in events])

    async def list(
        self, *, limit: int, after: PageCursor | None, user_id: uuid.UUID | None
    ) -> Sequence[AuditEvent]:
        """Newest first, ties broken by id; keyset pagination."""
        c = audit_events.c
        stmt = select(audit_events).order_by(c.create_time.desc(), c.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(c.user_id == user_id)
        if after is not None:
            stmt = stmt.where(tuple_(c.create_time, c.id) < tuple_(after.create_time, after.id))
        rows = (await self._conn.execute(stmt)).all()
        return [
            AuditEvent(
                id=r.id,
                user_id=r.user_id,
                action=r.action,
                changes=r.changes,
                actor=r.actor,
                request_id=r.request_id,
                create_time=r.create_time,
            )
            for r in rows
        ]
