"""The change feed's storage: events written in the change's transaction, read in order.

Writing (UserEventRepository, inside a unit of work) and reading (the sources below, outside
any) are the only SQL of the feed.

Ordering on PostgreSQL
----------------------
Every event takes `seq` from the sequence user_events_seq. A sequence hands out numbers in
call order, not commit order: a transaction holding seq 1 may commit after one holding seq 2.
A reader that delivered 2 and moved its position past it would never deliver 1. So a reader
delivers an event only when no transaction that could still commit a smaller seq is in
flight. The proof, for a reader at position P:

1. The writer's transaction id exists before it takes a number: the insert reads
   pg_current_xact_id() (which assigns one) in a MATERIALIZED CTE, and nextval() runs in the
   outer SELECT over that CTE's row, so after it. (Every use case has also written the users
   row before, which assigns the id as well.)
2. The reader reads H = the sequence's last value: every seq <= H has been handed out by
   then, to transactions whose ids exist by (1).
3. Then, in a transaction of its own that ends at once, it reads N = pg_current_xact_id(),
   a new transaction id. Ids are handed out in increasing order, so every writer holding a
   seq <= H (whose id existed before H was read) has an id < N.
   (pg_snapshot_xmax would not do: it is one past the latest *completed* id, and a writer
   whose id is newer than that appears in no snapshot's in-progress list.)
4. Any later statement whose snapshot has pg_snapshot_xmin >= N sees no transaction with an
   id < N in flight: N had completed before that snapshot, so every unfinished id below N
   would be listed in it and bring its xmin below N. Each writer of a seq <= H has therefore
   committed (its row is visible in that very snapshot) or rolled back (its row will never
   exist). The rows (P, H] read in that statement are final, and the reader may move its
   position to H.

The reader keeps the (H, N) pairs it has taken and, on every read, settles the largest H
whose N is below the statement's xmin; meanwhile it may still deliver the events that follow
P without a gap (P+1, P+2, ...), which are committed and have nothing missing before them.
Writers therefore never wait for readers, and a reader never waits longer than the
transactions that were in flight when it looked. (Ordering by the writer's transaction id
would be wrong: a writer waiting on a row lock already holds an id and commits later.)

Two writes of the same user are ordered by the user's row lock, which the first holds until
it commits after taking its seq: per user, seq order is commit order. Across users, seq
order is one total order consistent with it; every reader sees the same one.

On SQLite writers are serialized (BEGIN IMMEDIATE) and take seq under the write lock, so the
committed events are always a prefix of seq order.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usersvc.adapters.db_errors import raise_translated
from usersvc.adapters.tables import user_events
from usersvc.domain.user_events import UserChange, UserEventRecord
from usersvc.domain.user_json import user_from_json, user_to_json

# Channel of the wake-up NOTIFY; delivered to listeners when the writing transaction commits.
NOTIFY_CHANNEL = "usersvc_user_events"

_INSERT_PG = text(
    # The CTE assigns the transaction id before nextval() runs (proof step 1) and queues the
    # wake-up for every listener, sent by PostgreSQL at commit (never for a rollback).
    "WITH tx AS MATERIALIZED ("
    " SELECT pg_current_xact_id() AS xid, pg_notify(:channel, '')::text AS notified)"
    ' INSERT INTO user_events (seq, user_id, type, "user", changed_fields, request_id,'
    " create_time)"
    " SELECT nextval('user_events_seq'), :user_id, :type, CAST(:user AS jsonb),"
    " CAST(:changed_fields AS jsonb), :request_id, :create_time FROM tx"
)
_INSERT_SQLITE = insert(user_events)
_COLUMNS = (
    user_events.c.seq,
    user_events.c.user_id,
    user_events.c.type,
    user_events.c.user,
    user_events.c.changed_fields,
    user_events.c.request_id,
    user_events.c.create_time,
)


# Service watchers read the feed too: admin_metadata is for admins only.
FEED_OMITS = ("admin_metadata",)


def _record(row: Any) -> UserEventRecord:
    return UserEventRecord(
        position=int(row.seq),
        change=UserChange(
            type=row.type,
            user=user_from_json(row.user),
            changed_fields=tuple(row.changed_fields),
            request_id=row.request_id,
            create_time=row.create_time.astimezone(UTC)
            if row.create_time.tzinfo is not None
            else row.create_time.replace(tzinfo=UTC),
        ),
    )


class UserEventRepository:
    """Appends events inside a unit of work; `added` tells the unit of work to wake readers."""

    def __init__(self, conn: AsyncConnection, *, postgres: bool) -> None:
        self._conn = conn
        self._postgres = postgres
        self.added = False

    async def add(self, change: UserChange) -> None:
        await self.add_many([change])

    async def add_many(self, changes: Sequence[UserChange]) -> None:
        """One executemany of the same statement (each row takes its seq as `add` does)."""
        if not changes:
            return
        rows = [self._values(change) for change in changes]
        if self._postgres:
            await self._conn.execute(_INSERT_PG, rows)
        else:
            await self._conn.execute(_INSERT_SQLITE, rows)
        self.added = True

    def _values(self, change: UserChange) -> dict[str, Any]:
        values = {
            "user_id": change.user_id,
            "type": change.type,
            "user": user_to_json(change.user, omit=FEED_OMITS),
            "changed_fields": list(change.changed_fields),
            "request_id": change.request_id[:128],
            "create_time": change.create_time,
        }
        if self._postgres:
            values["user"] = json.dumps(values["user"])
            values["changed_fields"] = json.dumps(values["changed_fields"])
            values["channel"] = NOTIFY_CHANNEL
        return values


class _Source:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def purge_older_than(self, cutoff: datetime) -> int:
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(
                    delete(user_events).where(user_events.c.create_time < cutoff)
                )
        except Exception as err:
            raise_translated(err)
            raise
        return int(result.rowcount or 0)

    async def _rows(self, conn: AsyncConnection, after: int, limit: int) -> list[Any]:
        stmt = select(*_COLUMNS).where(user_events.c.seq > after)
        return list((await conn.execute(stmt.order_by(user_events.c.seq).limit(limit))).all())


class SqliteUserEventSource(_Source):
    """SQLite: committed events are a prefix of seq order (writers are serialized)."""

    async def head(self) -> int:
        try:
            async with self._engine.connect() as conn:
                value = (
                    await conn.execute(
                        text("SELECT seq FROM sqlite_sequence WHERE name = 'user_events'")
                    )
                ).scalar()
        except Exception as err:
            raise_translated(err)
            raise
        return int(value or 0)

    def cursor(self, position: int) -> SqliteUserEventCursor:
        return SqliteUserEventCursor(self, position)


class SqliteUserEventCursor:
    def __init__(self, source: SqliteUserEventSource, position: int) -> None:
        self._source = source
        self.position = position

    async def next_batch(self, limit: int) -> Sequence[UserEventRecord]:
        try:
            async with self._source._engine.connect() as conn:
                rows = await self._source._rows(conn, self.position, limit)
        except Exception as err:
            raise_translated(err)
            raise
        records = [_record(r) for r in rows]
        if records:
            self.position = records[-1].position
        return records


_HEAD_PG = text("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM user_events_seq")
_NEW_XID_PG = text("SELECT pg_current_xact_id()::text::bigint")
# The events and the xmin of the one snapshot they are read in (proof step 4).
_READ_PG = text(
    'SELECT s.xmin, e.seq, e.user_id, e.type, e."user", e.changed_fields, e.request_id,'
    " e.create_time"
    " FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin) AS s"
    " LEFT JOIN LATERAL (SELECT * FROM user_events WHERE seq > :after AND seq <= :upto"
    " ORDER BY seq LIMIT :limit) AS e ON true"
)
_XMIN_PG = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
# Horizons a cursor remembers at most; more only while a transaction stays open that long.
MAX_PENDING_HORIZONS = 1024
HEAD_SETTLE_SECONDS = 0.005


class PostgresUserEventSource(_Source):
    """PostgreSQL: delivers only events below a settled horizon (see the module's proof)."""

    async def head(self) -> int:
        """A position with every event at or before it committed or rolled back: waits (a few
        milliseconds) for the transactions in flight when it was called."""
        try:
            async with self._engine.connect() as conn:
                head, bound = await _take_horizon(conn)
                while int((await conn.execute(_XMIN_PG)).scalar_one()) < bound:
                    await conn.rollback()
                    await asyncio.sleep(HEAD_SETTLE_SECONDS)
        except Exception as err:
            raise_translated(err)
            raise
        return head

    def cursor(self, position: int) -> PostgresUserEventCursor:
        return PostgresUserEventCursor(self, position)


async def _read_head(conn: AsyncConnection) -> int:
    """H of proof step 2."""
    head = int((await conn.execute(_HEAD_PG)).scalar_one())
    await conn.commit()
    return head


async def _new_xid(conn: AsyncConnection) -> int:
    """N of proof step 3: after the sequence was read, in a transaction of its own (committed,
    or rolled back: either way completed before the snapshot of step 4). It uses up a
    transaction id, so it is taken only when the head has moved."""
    new_xid = int((await conn.execute(_NEW_XID_PG)).scalar_one())
    await conn.commit()
    return new_xid


async def _take_horizon(conn: AsyncConnection) -> tuple[int, int]:
    """(H, N) of proof steps 2 and 3."""
    head = await _read_head(conn)
    return head, await _new_xid(conn)


class PostgresUserEventCursor:
    def __init__(self, source: PostgresUserEventSource, position: int) -> None:
        self._source = source
        self.position = position
        # Every event at or below this seq is final (proof step 4).
        self._settled = position
        # (H, N) pairs not settled yet, oldest first, H increasing.
        self._pending: deque[tuple[int, int]] = deque()

    async def next_batch(self, limit: int) -> Sequence[UserEventRecord]:
        """The next events in seq order, at most `limit`, never past one still in flight."""
        try:
            async with self._source._engine.connect() as conn:
                head = await _read_head(conn)
                if head > self._settled and (not self._pending or self._pending[-1][0] < head):
                    if len(self._pending) >= MAX_PENDING_HORIZONS:
                        # Keep the oldest (it settles first); the newest is replaced.
                        del self._pending[-1]
                    self._pending.append((head, await _new_xid(conn)))
                upto = self._pending[-1][0] if self._pending else self._settled
                if upto <= self.position:
                    return []
                rows = (
                    await conn.execute(
                        _READ_PG, {"after": self.position, "upto": upto, "limit": limit}
                    )
                ).all()
        except Exception as err:
            raise_translated(err)
            raise
        xmin = int(rows[0].xmin)
        while self._pending and self._pending[0][1] <= xmin:
            self._settled = max(self._settled, self._pending.popleft()[0])
        found = [r for r in rows if r.seq is not None]
        records: list[UserEventRecord] = []
        expected = self.position + 1
        for row in found:
            seq = int(row.seq)
            # At or below the settled horizon every row is final; above it, only a run
            # without a gap after the position is (a gap may be a transaction in flight).
            if seq > self._settled and seq != expected:
                break
            records.append(_record(row))
            expected = seq + 1
        if records:
            self.position = records[-1].position
        if len(found) < limit:
            # Every row up to the settled horizon was read and delivered: numbers nobody
            # committed (rolled back transactions) are passed over.
            self.position = max(self.position, self._settled)
        return records
