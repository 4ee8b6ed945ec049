"""OutboxRepository: writes outbox rows inside the caller's transaction, claims and settles them.

Lifecycle of a row: `pending` until the dispatcher settles it as `delivered`, `failed` (gave up
after the maximum attempts) or `skipped` (nothing to deliver any more, e.g. the user is gone).
A dispatcher claims a pending row by setting `claimed_until` (a lease) in a short transaction,
delivers outside any transaction, then settles the row in another short one.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    func,
    insert,
    literal,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.bulk_insert import insert_rows
from usersvc.adapters.tables import outbox, users
from usersvc.domain.events import SECRET_PAYLOAD_KEYS, OutboxMessage
from usersvc.domain.models import UserState
from usersvc.domain.records import ClaimedOutboxMessage, OutboxStatus
from usersvc.trace_context import current_traceparent

PENDING = OutboxStatus.PENDING.value
DELIVERED = OutboxStatus.DELIVERED.value
FAILED = OutboxStatus.FAILED.value
SKIPPED = OutboxStatus.SKIPPED.value

# last_error is for operators; a whole SMTP transcript is not needed to see what went wrong.
ERROR_MAX_CHARS = 1000

_INSERT = insert(outbox)


def _row(message: OutboxMessage, trace_context: str | None) -> dict[str, Any]:
    return {
        "id": message.id,
        "topic": message.topic,
        "aggregate_id": message.aggregate_id,
        "payload": message.payload,
        "request_id": message.request_id,
        "status": PENDING,
        "attempts": 0,
        "next_attempt_time": message.create_time,
        "claimed_until": None,
        "last_error": None,
        "create_time": message.create_time,
        "update_time": message.create_time,
        "trace_context": trace_context,
    }


class OutboxRepository:
    """Outbox rows on one connection (the unit of work's)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, message: OutboxMessage) -> None:
        await self._conn.execute(_INSERT, _row(message, current_traceparent()))

    async def add_many(self, messages: Sequence[OutboxMessage]) -> None:
        """One COPY on PostgreSQL, one executemany elsewhere."""
        trace = current_traceparent()
        await insert_rows(self._conn, outbox, [_row(m, trace) for m in messages])

    async def count_by_status(self) -> dict[str, int]:
        """How many rows are pending and failed (for the metrics; served by the status index)."""
        rows = await self._conn.execute(
            select(outbox.c.status, func.count())
            .where(outbox.c.status.in_((PENDING, FAILED)))
            .group_by(outbox.c.status)
        )
        counts = dict.fromkeys((PENDING, FAILED), 0)
        counts.update({str(status): int(count) for status, count in rows.all()})
        return counts

    async def claim_due(
        self,
        *,
        topics: Collection[str],
        now: datetime,
        lease_until: datetime,
        limit: int,
    ) -> list[ClaimedOutboxMessage]:
        """Lease up to `limit` due pending rows of `topics`, oldest due first.

        Due: pending, next_attempt_time reached, and not leased (or the lease ran out, so a
        crashed dispatcher's rows come back). The caller commits; the lease then keeps other
        dispatchers away while it delivers outside the transaction. On PostgreSQL the rows
        are locked with SKIP LOCKED, so concurrent dispatchers take disjoint batches instead
        of waiting for each other; on SQLite the caller's write transaction (BEGIN IMMEDIATE)
        already serializes claimers.
        """
        stmt = (
            select(
                outbox.c.id,
                outbox.c.topic,
                outbox.c.aggregate_id,
                outbox.c.payload,
                outbox.c.request_id,
                outbox.c.attempts,
                outbox.c.create_time,
                outbox.c.trace_context,
                users.c.email,
                users.c.name,
            )
            # Outbox rows outlive their user; the outer join says whether it still exists
            # (a soft-deleted user counts as gone: no mail to a deleted account).
            .select_from(
                outbox.outerjoin(
                    users,
                    and_(
                        users.c.id == outbox.c.aggregate_id,
                        users.c.state != UserState.DELETED.value,
                    ),
                )
            )
            .where(
                outbox.c.status == PENDING,
                outbox.c.topic.in_(list(topics)),
                outbox.c.next_attempt_time <= now,
                or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now),
            )
            .order_by(outbox.c.next_attempt_time, outbox.c.id)
            .limit(limit)
        )
        if self._conn.dialect.name == "postgresql":
            # OF outbox: PostgreSQL cannot lock the nullable side of an outer join, and the
            # users row needs no lock (a deletion racing the claim is caught at the next claim
            # at worst, a window of one delivery).
            stmt = stmt.with_for_update(skip_locked=True, of=outbox)
        rows = (await self._conn.execute(stmt)).all()
        if not rows:
            return []
        ids = [row.id for row in rows]
        await self._conn.execute(
            update(outbox)
            .where(outbox.c.id.in_(ids))
            .values(claimed_until=lease_until, update_time=now)
        )
        return [
            ClaimedOutboxMessage(
                id=row.id,
                topic=row.topic,
                aggregate_id=row.aggregate_id,
                payload=dict(row.payload),
                request_id=row.request_id,
                attempts=row.attempts,
                create_time=row.create_time,
                claimed_until=lease_until,
                user_email=row.email,
                user_name=row.name,
                trace_context=row.trace_context,
            )
            for row in rows
        ]

    def _without_secrets(self) -> ColumnElement[Any]:
        """The payload with SECRET_PAYLOAD_KEYS removed, in SQL (no read-modify-write)."""
        payload: ColumnElement[Any] = outbox.c.payload
        for key in SECRET_PAYLOAD_KEYS:
            if self._conn.dialect.name == "postgresql":
                payload = type_coerce(payload.op("-")(literal(key, String())), JSONB())
            else:
                payload = func.json_remove(payload, f"$.{key}")
        return payload

    async def mark_delivered(self, message_id: uuid.UUID, *, now: datetime) -> bool:
        """Settle a delivered row; False if it was no longer pending.

        Not fenced by the lease on purpose: the mail went out, and recording that even after
        the lease ran out keeps a second dispatcher from sending it again.
        """
        result = await self._conn.execute(
            update(outbox)
            .where(outbox.c.id == message_id, outbox.c.status == PENDING)
            .values(
                status=DELIVERED,
                attempts=outbox.c.attempts + 1,
                claimed_until=None,
                last_error=None,
                update_time=now,
                payload=self._without_secrets(),
            )
        )
        return bool(result.rowcount)

    async def schedule_retry(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        next_attempt_time: datetime,
        error: str,
        now: datetime,
    ) -> bool:
        """Record a failed attempt and when to try again; False if the lease was lost."""
        return await self._settle_claimed(
            message_id,
            claimed_until,
            status=PENDING,
            attempts=attempts,
            next_attempt_time=next_attempt_time,
            last_error=error[:ERROR_MAX_CHARS],
            update_time=now,
        )

    async def mark_failed(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        error: str,
        now: datetime,
    ) -> bool:
        """Give up on a row after its last attempt; False if the lease was lost."""
        return await self._settle_claimed(
            message_id,
            claimed_until,
            status=FAILED,
            attempts=attempts,
            last_error=error[:ERROR_MAX_CHARS],
            update_time=now,
            payload=self._without_secrets(),
        )

    async def mark_skipped(
        self, message_id: uuid.UUID, *, claimed_until: datetime, reason: str, now: datetime
    ) -> bool:
        """Settle a row that must not be delivered (its user is gone); False if lease lost."""
        return await self._settle_claimed(
            message_id,
            claimed_until,
            status=SKIPPED,
            last_error=reason[:ERROR_MAX_CHARS],
            update_time=now,
            payload=self._without_secrets(),
        )

    async def release(self, message_id: uuid.UUID, *, claimed_until: datetime) -> bool:
        """Give a claimed row back untried, due at once; False if the lease was lost."""
        return await self._settle_claimed(message_id, claimed_until, status=PENDING)

    async def _settle_claimed(
        self, message_id: uuid.UUID, claimed_until: datetime, **values: Any
    ) -> bool:
        # Fenced by the lease: if ours ran out and another dispatcher claimed the row since,
        # its claim wins and this write matches nothing.
        result = await self._conn.execute(
            update(outbox)
            .where(
                and_(
                    outbox.c.id == message_id,
                    outbox.c.status == PENDING,
                    outbox.c.claimed_until == claimed_until,
                )
            )
            .values(claimed_until=None, **values)
        )
        return bool(result.rowcount)
