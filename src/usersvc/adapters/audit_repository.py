"""AuditRepository: append and read audit events; it has no update or delete on purpose.

The one exception is `tombstone_user`, which purging a soft-deleted user calls: the only
sanctioned rewrite of audit rows, and it only ever replaces personal values with a marker.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.bulk_insert import insert_rows
from usersvc.adapters.tables import JsonList, audit_events
from usersvc.domain.audit import AuditEvent, tombstone
from usersvc.domain.models import PageCursor

_INSERT = insert(audit_events)
_EVENTS_OF_USER = select(audit_events.c.id, audit_events.c.changes).where(
    audit_events.c.user_id == bindparam("user_id")
)
_SET_CHANGES = (
    update(audit_events)
    .where(audit_events.c.id == bindparam("event_id"))
    .values(changes=bindparam("new_changes", type_=JsonList))
)


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

    async def tombstone_user(self, user_id: uuid.UUID) -> int:
        """Replace the e-mail and name values in every event about `user_id` with the purge
        marker (domain.audit.tombstone); the rest of each row stays. How many rows changed."""
        rows = (await self._conn.execute(_EVENTS_OF_USER, {"user_id": user_id})).all()
        rewrites = [
            {"event_id": r.id, "new_changes": new}
            for r in rows
            if (new := tombstone(r.changes)) != r.changes
        ]
        if rewrites:
            await self._conn.execute(_SET_CHANGES, rewrites)
        return len(rewrites)

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
