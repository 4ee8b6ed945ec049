"""The hottest reads (a user by id, a user's token state) without the ORM's per-call cost.

Every authenticated call checks the caller's token state and GetUser reads one row by primary
key. Through SQLAlchemy's async bridge such a read costs more Python than the rest of the call;
here each backend runs one fixed statement on the driver itself, and the results are decoded
exactly as the Core tables decode them (the store contract tests compare both paths).

- PostgreSQL: a few asyncpg connections of its own, lent one statement at a time, statements
  prepared once per connection, no BEGIN/ROLLBACK round trips.
- SQLite (a file): one plain `sqlite3` connection used on the event loop's own thread, with no
  hop through aiosqlite's worker thread. See `SqlitePointReads` for why that is safe.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from usersvc.domain.errors import StorageUnavailable
from usersvc.domain.models import PageCursor, User, UserState, UserView

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# Fixed statements (no input is ever formatted into them: S608 below is about that); the
# column order is what _user() reads. Labels and admin metadata are JSON columns of the same
# row (users.labels is what reads return; user_labels only serves filters), so GetUser stays
# one primary-key read.
_COLUMNS = (
    "id, email, name, password_hash, roles, state, create_time, update_time, version,"
    " token_version, failed_login_count, locked_until, last_login_time, password_change_time,"
    " delete_time, purge_time, deleted_from_state, labels, admin_metadata, email_verified,"
    " password_change_required"
)
_GET_PG = f"SELECT {_COLUMNS} FROM users WHERE id = $1"  # noqa: S608
# The unfiltered list (deleted users left out) in list order: what list_statement in
# user_repository builds for an empty filter, written out so it runs without the ORM. Served by
# ix_users_create_time_id read backwards; tests compare both paths and check the plan.
LIST_FIRST_PG = (
    f"SELECT {_COLUMNS} FROM users WHERE state != 'deleted'"  # noqa: S608
    " ORDER BY create_time DESC, id DESC LIMIT $1"
)
LIST_AFTER_PG = (
    f"SELECT {_COLUMNS} FROM users WHERE state != 'deleted'"  # noqa: S608
    " AND (create_time, id) < ($2, $3) ORDER BY create_time DESC, id DESC LIMIT $1"
)
_GET_MANY_PG = f"SELECT {_COLUMNS} FROM users WHERE id = ANY($1::uuid[])"  # noqa: S608
_AUTH_STATE_PG = "SELECT token_version, state FROM users WHERE id = $1"
# Login's read: by the unique e-mail (a stored address is already normalised).
_GET_BY_EMAIL_PG = f"SELECT {_COLUMNS} FROM users WHERE email = $1"  # noqa: S608
_GET_SQLITE = _GET_PG.replace("$1", "?")
_GET_BY_EMAIL_SQLITE = _GET_BY_EMAIL_PG.replace("$1", "?")
# The ids as one JSON array of the hex form SQLite stores: one statement for any count.
_GET_MANY_SQLITE = f"SELECT {_COLUMNS} FROM users WHERE id IN (SELECT value FROM json_each(?))"  # noqa: S608
_AUTH_STATE_SQLITE = _AUTH_STATE_PG.replace("$1", "?")


def _utc(value: datetime | None) -> datetime | None:
    # asyncpg hands timestamptz over in UTC already: as it is (the common case, per column
    # of every row of a page).
    if value is None or value.tzinfo is UTC:
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_object(text: str | None) -> dict[str, Any]:
    # Most users have no labels and no metadata: "{}" needs no parser.
    if text is None or text == "{}":
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def _sqlite_time(value: str | None) -> datetime | None:
    # SQLAlchemy's SQLite DateTime stores naive UTC as "YYYY-MM-DD HH:MM:SS[.ffffff]". Parsed
    # with its offset spelled out: a fraction of the cost of parsing, then replace(tzinfo=).
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value + "+00:00")
    except ValueError:
        return datetime.fromisoformat(value).replace(tzinfo=UTC)


# The few distinct role lists and states, decoded once: rows repeat them.
_ROLES_CACHE_MAX = 256
_roles_cache: dict[str, tuple[str, ...]] = {}
_STATES = {state.value: state for state in UserState}


def _roles(text: str) -> tuple[str, ...]:
    roles = _roles_cache.get(text)
    if roles is None:
        roles = tuple(json.loads(text))
        if len(_roles_cache) < _ROLES_CACHE_MAX:
            _roles_cache[text] = roles
    return roles


def _uuid(raw: Any, ids: dict[str, uuid.UUID] | None) -> uuid.UUID:
    if isinstance(raw, uuid.UUID):
        return raw
    # SQLite's hex text; a batch passes the ids it asked for, already parsed.
    return (ids.get(raw) if ids else None) or uuid.UUID(raw)


def _user(row: Sequence[Any] | asyncpg.Record, times: tuple[Any, ...]) -> User:
    (
        create_time,
        update_time,
        locked_until,
        last_login_time,
        password_change_time,
        delete_time,
        purge_time,
    ) = times
    return User(
        id=_uuid(row[0], None),
        email=row[1],
        name=row[2],
        password_hash=row[3],
        roles=_roles(row[4]),
        state=_STATES[row[5]],
        create_time=create_time,
        update_time=update_time,
        version=row[8],
        token_version=row[9],
        failed_login_count=row[10],
        locked_until=locked_until,
        last_login_time=last_login_time,
        password_change_time=password_change_time,
        delete_time=delete_time,
        purge_time=purge_time,
        deleted_from_state=_STATES[row[16]] if row[16] is not None else None,
        # JSON text on both drivers (asyncpg hands jsonb over as text); NULL: none.
        labels=_json_object(row[17]),
        admin_metadata=_json_object(row[18]),
        # asyncpg gives a bool, sqlite3 the integer SQLite stores.
        email_verified=bool(row[19]),
        password_change_required=bool(row[20]),
    )


def _view(
    row: Sequence[Any] | asyncpg.Record,
    times: tuple[Any, ...],
    ids: dict[str, uuid.UUID] | None = None,
) -> UserView:
    """Straight to the view, as _user(row).view() would make it (the contract tests compare):
    no User, no password hash. What a batch of reads answers with, so per user it is built
    positionally, in UserView's field order."""
    return UserView(
        _uuid(row[0], ids),
        row[1],
        row[2],
        _roles(row[4]),
        _STATES[row[5]],
        times[0],  # create_time
        times[1],  # update_time
        row[8],
        row[9],
        row[10],
        times[2],  # locked_until
        times[3],  # last_login_time
        times[4],  # password_change_time
        times[5],  # delete_time
        times[6],  # purge_time
        _json_object(row[17]),
        _json_object(row[18]),
        bool(row[19]),
        bool(row[20]),
    )


def _pg_times(row: asyncpg.Record) -> tuple[datetime | None, ...]:
    return tuple(_utc(row[i]) for i in (6, 7, 11, 12, 13, 14, 15))


def _sqlite_times(row: Sequence[Any]) -> tuple[datetime | None, ...]:
    t = _sqlite_time
    return (t(row[6]), t(row[7]), t(row[11]), t(row[12]), t(row[13]), t(row[14]), t(row[15]))


def _pg_user(row: asyncpg.Record) -> User:
    return _user(row, _pg_times(row))


def _sqlite_user(row: tuple[Any, ...]) -> User:
    return _user(row, _sqlite_times(row))


APPLICATION_NAME = "usersvc-point-reads"
# A broken link raises one of these; the read is retried once on a new connection.
_LINK_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
)


class ConnectionLender:
    """Up to `size` asyncpg connections, each lent for one statement at a time.

    Why not asyncpg's Pool: for a single statement its acquire/release costs more client CPU
    than the statement (measured on this service's read: 239 against 137 us of CPU per read
    at 32 in flight), because every release is a shielded task and, by default, a reset
    query (`RESET ALL; UNLISTEN *; ...`) sent to the server. These connections only ever run
    one autocommit SELECT at a time, so there is no session state to reset, and lending is a
    list pop and push.

    A connection whose statement failed or was cancelled (a deadline) is closed, never lent
    again, and replaced on demand; callers waiting for a connection are served in order.
    """

    def __init__(self, dsn: str, *, size: int, application_name: str = APPLICATION_NAME) -> None:
        self._dsn = dsn
        self._size = size
        self._server_settings = {"application_name": application_name}
        self._idle: list[asyncpg.Connection[asyncpg.Record]] = []
        self._opened = 0  # idle, lent, or being opened
        # A waiter gets a connection, or None: "open one yourself" (one was closed).
        self._waiters: collections.deque[
            asyncio.Future[asyncpg.Connection[asyncpg.Record] | None]
        ] = collections.deque()
        self._closed = False

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._run("fetchrow", query, args)
        return row

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run("fetch", query, args)
        return rows

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        reused = bool(self._idle)
        connection = await self._take()
        try:
            result = await getattr(connection, method)(query, *args)
        except _LINK_ERRORS:
            self._discard(connection)
            if not reused:
                raise
            # An idle connection the server has since closed (a restart, an idle timeout):
            # the read is safe to repeat, once, on a new connection.
            connection = await self._take(fresh=True)
            try:
                result = await getattr(connection, method)(query, *args)
            except BaseException:
                self._discard(connection)
                raise
        except BaseException:
            self._discard(connection)
            raise
        self._give_back(connection)
        return result

    async def _take(self, *, fresh: bool = False) -> asyncpg.Connection[asyncpg.Record]:
        if self._closed:
            raise asyncpg.InterfaceError("point reads are closed")
        while self._idle and not fresh:
            idle = self._idle.pop()
            if not idle.is_closed():
                return idle
            self._opened -= 1  # closed while idle (the server went away): not lent again
        if self._opened >= self._size and not (fresh and self._idle):
            waiter: asyncio.Future[asyncpg.Connection[asyncpg.Record] | None]
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                lent = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Handed a connection (or the right to open one) just as it was cancelled.
                    handed = waiter.result()
                    if handed is not None:
                        self._give_back(handed)
                    else:
                        # Its place was counted for it: free it, or it stays taken for good.
                        self._opened -= 1
                        self._pass_on_opening()
                raise
            if lent is not None:
                return lent
            # A connection was closed: open its replacement (self._opened already counts it).
        elif fresh and self._idle:
            # The retry after a broken idle connection: the others went idle at the same time.
            for stale in self._idle:
                self._opened -= 1
                stale.terminate()
            self._idle.clear()
            self._opened += 1
        else:
            self._opened += 1
        try:
            return await asyncpg.connect(self._dsn, server_settings=self._server_settings)
        except BaseException:
            self._opened -= 1
            self._pass_on_opening()
            raise

    def _give_back(self, connection: asyncpg.Connection[asyncpg.Record]) -> None:
        if self._closed:
            connection.terminate()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.append(connection)

    def _discard(self, connection: asyncpg.Connection[asyncpg.Record]) -> None:
        connection.terminate()
        self._opened -= 1
        self._pass_on_opening()

    def _pass_on_opening(self) -> None:
        """Below size again: the first waiter opens a connection (counted here for it)."""
        while self._waiters and self._opened < self._size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._opened += 1
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        self._opened -= len(idle)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("point reads are closed"))
        self._waiters.clear()
        await asyncio.gather(*(c.close(timeout=5) for c in idle), return_exceptions=True)


class PostgresPointReads:
    """Point reads on a few asyncpg connections of their own (see ConnectionLender), each
    statement prepared once per connection (asyncpg's statement cache), in autocommit: no
    BEGIN/ROLLBACK round trips.

    asyncpg rather than psycopg here because this is the one place where the driver's own
    Python cost shows: about 100 us of CPU per read against about 200 us through psycopg's
    async cursor, measured on this service's query. The connections are part of the server's
    connection budget (see bootstrap.create_engines); broken ones are replaced.
    """

    def __init__(self, url: str, *, size: int, application_name: str = APPLICATION_NAME) -> None:
        dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._connections = ConnectionLender(dsn, size=size, application_name=application_name)

    async def _fetch(self, query: str, key: uuid.UUID | str) -> asyncpg.Record | None:
        return await self._guarded(self._connections.fetchrow(query, key))

    async def _guarded(self, read: Awaitable[_T]) -> _T:
        try:
            return await read
        except _LINK_ERRORS as err:
            log.warning("database unavailable: %s", type(err).__name__)
            raise StorageUnavailable() from err
        except asyncpg.PostgresError as err:
            # Shutdown (57P) and insufficient resources (53) are as transient as a lost link.
            if str(getattr(err, "sqlstate", "")).startswith(("57P", "53")):
                log.warning("database unavailable: %s", type(err).__name__)
                raise StorageUnavailable() from err
            raise

    async def get(self, user_id: uuid.UUID) -> User | None:
        row = await self._fetch(_GET_PG, user_id)
        return None if row is None else _pg_user(row)

    async def get_by_email(self, email: str) -> User | None:
        row = await self._fetch(_GET_BY_EMAIL_PG, email)
        return None if row is None else _pg_user(row)

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[UserView]:
        if not user_ids:
            return []
        rows = await self._guarded(self._connections.fetch(_GET_MANY_PG, list(user_ids)))
        return [_view(row, _pg_times(row)) for row in rows]

    async def list_page(self, *, limit: int, after: PageCursor | None) -> Sequence[User]:
        if after is None:
            read = self._connections.fetch(LIST_FIRST_PG, limit)
        else:
            read = self._connections.fetch(LIST_AFTER_PG, limit, after.create_time, after.id)
        return [_pg_user(row) for row in await self._guarded(read)]

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        row = await self._fetch(_AUTH_STATE_PG, user_id)
        return (int(row[0]), UserState(row[1])) if row is not None else None

    async def close(self) -> None:
        await self._connections.close()


class SqlitePointReads:
    """Point reads on one plain sqlite3 connection, on the event loop's thread.

    Why this is safe to run on the event loop: in WAL mode a reader never waits for a writer
    (it reads the last committed snapshot), so a primary-key lookup costs a few page reads from
    the OS cache - microseconds, less than the thread hop aiosqlite would need. The connection
    never waits on a lock either: busy_timeout is 0, and in the rare cases where WAL still
    answers SQLITE_BUSY (another process recovering the WAL index) the read is handed to
    `fallback`, which runs it through the thread-backed engine with its busy timeout. The
    connection is read-only (`query_only`), autocommit (each SELECT sees the latest commit),
    and only ever used from this one thread (sqlite3's check_same_thread stays on).
    """

    def __init__(self, path: Path, *, fallback: Any) -> None:
        self._path = path
        self._fallback = fallback
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, cached_statements=16)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=0")
            self._conn = conn
        return self._conn

    def _fetch(self, query: str, user_id: uuid.UUID) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._connection().execute(query, (user_id.hex,)).fetchone()
        return row

    async def get(self, user_id: uuid.UUID) -> User | None:
        try:
            row = self._fetch(_GET_SQLITE, user_id)
        except sqlite3.OperationalError:
            user: User | None = await self._fallback.get(user_id)
            return user
        return None if row is None else _sqlite_user(row)

    async def get_by_email(self, email: str) -> User | None:
        try:
            row = self._connection().execute(_GET_BY_EMAIL_SQLITE, (email,)).fetchone()
        except sqlite3.OperationalError:
            user: User | None = await self._fallback.get_by_email(email)
            return user
        return None if row is None else _sqlite_user(row)

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[UserView]:
        if not user_ids:
            return []
        by_hex = {u.hex: u for u in user_ids}
        try:
            rows = self._connection().execute(_GET_MANY_SQLITE, (json.dumps(list(by_hex)),))
            found = rows.fetchall()
        except sqlite3.OperationalError:
            users: Sequence[UserView] = await self._fallback.get_many(user_ids)
            return users
        return [_view(row, _sqlite_times(row), by_hex) for row in found]

    async def list_page(self, *, limit: int, after: PageCursor | None) -> Sequence[User]:
        # Pages are not this path's business on SQLite: a page is many rows, and the list
        # is the embedded default's cold path.
        users: Sequence[User] = await self._fallback.list_page(limit=limit, after=after)
        return users

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        try:
            row = self._fetch(_AUTH_STATE_SQLITE, user_id)
        except sqlite3.OperationalError:
            state: tuple[int, UserState] | None = await self._fallback.auth_state(user_id)
            return state
        return (int(row[0]), UserState(row[1])) if row is not None else None

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
