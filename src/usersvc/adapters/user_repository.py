"""UserRepository: the only place that knows the SQL of the users table."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    String,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from usersvc.adapters.bulk_insert import insert_rows
from usersvc.adapters.tables import user_labels, users
from usersvc.domain.errors import EmailLookalike, EmailTaken, RetryableConflict
from usersvc.domain.models import SERVICE_ACCOUNT_PASSWORD_HASH, PageCursor, User, UserState
from usersvc.domain.user_filter import OptionalTimeBound, UserFilter
from usersvc.domain.validation import email_skeleton

# The table, under a name add_many's parameter does not hide.
_USERS = users
# Statements built once; SQLAlchemy caches their compiled form.
_GET_BY_ID = select(users).where(users.c.id == bindparam("id"))
# Row lock on PostgreSQL; SQLite's write transactions are already exclusive (BEGIN IMMEDIATE).
_GET_BY_ID_FOR_UPDATE = _GET_BY_ID.with_for_update()
# One array parameter on PostgreSQL: a short statement the driver parses once and caches,
# where IN (...) would render and parse one placeholder per id on every call.
_GET_MANY_POSTGRESQL = select(users).where(
    users.c.id == any_(bindparam("ids", type_=ARRAY(Uuid())))
)
_GET_MANY = select(users).where(users.c.id.in_(bindparam("ids", expanding=True)))
_GET_BY_EMAIL = select(users).where(users.c.email == bindparam("email"))
_GET_BY_SKELETON = (
    select(users.c.id, users.c.email)
    .where(users.c.email_skeleton == bindparam("skeleton"))
    .limit(1)
)
# Stored users whose e-mail, or its skeleton, equals one of a batch's: two array parameters
# on PostgreSQL (a short statement, whatever the batch), IN lists elsewhere.
_CONFLICTS_POSTGRESQL = select(users.c.email, users.c.email_skeleton).where(
    or_(
        users.c.email == any_(bindparam("emails", type_=ARRAY(String()))),
        users.c.email_skeleton == any_(bindparam("skeletons", type_=ARRAY(String()))),
    )
)
_CONFLICTS = select(users.c.email, users.c.email_skeleton).where(
    or_(
        users.c.email.in_(bindparam("emails", expanding=True)),
        users.c.email_skeleton.in_(bindparam("skeletons", expanding=True)),
    )
)
_AUTH_STATE = select(users.c.token_version, users.c.state).where(users.c.id == bindparam("id"))
_INSERT = insert(users)
# A new user unless its e-mail or the e-mail's skeleton is taken (both unique): one statement
# for a create; only when it inserted nothing (no id returned: the async drivers report no
# rowcount) does a read say which error that is.
_INSERT_NEW = {
    "postgresql": postgresql.insert(users).on_conflict_do_nothing().returning(users.c.id),
    "sqlite": sqlite.insert(users).on_conflict_do_nothing().returning(users.c.id),
}
_GET_BY_EMAIL_ONLY = select(users.c.id, users.c.email).where(users.c.email == bindparam("email"))
_ORDER = (users.c.create_time.desc(), users.c.id.desc())
# The planner's own row estimate: tuples per page from the last ANALYZE times the pages the
# table has now, so it follows growth between analyses. NULL before the first ANALYZE.
_ESTIMATED_COUNT_PG = text(
    "SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL"
    " ELSE round(c.reltuples / c.relpages"
    " * (pg_relation_size(c.oid) / current_setting('block_size')::int))::bigint END"
    " FROM pg_class c WHERE c.oid = 'users'::regclass"
)

# Columns an update may write; anything else is a programming error, never request data.
WRITABLE_COLUMNS = frozenset(
    {
        "email",
        "name",
        "password_hash",
        "password_change_time",
        "roles",
        "state",
        "update_time",
        # UnlockUser
        "failed_login_count",
        "locked_until",
        # Soft delete and UndeleteUser
        "delete_time",
        "purge_time",
        "deleted_from_state",
        # UpdateUser (admins); labels also rewrite the user's user_labels rows.
        "labels",
        "admin_metadata",
        # VerifyEmail; reset by a change of the e-mail
        "email_verified",
        "password_change_required",
    }
)
_INSERT_LABELS = insert(user_labels)
_DELETE_LABELS = delete(user_labels).where(user_labels.c.user_id == bindparam("user_id"))
# Deleted users whose purge time has come, oldest first (ix_users_purge_time).
_PURGEABLE = (
    select(users.c.id)
    .where(users.c.state == UserState.DELETED.value)
    .where(users.c.purge_time <= bindparam("now"))
    .order_by(users.c.purge_time, users.c.id)
    .limit(bindparam("limit"))
)


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching values that start with `prefix` taken literally."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def filter_conditions(where: UserFilter, dialect: str) -> list[ColumnElement[bool]]:
    """The filter as SQL conditions; every value a bound parameter.

    Each condition is one an index serves on PostgreSQL (migration 0007): state with the
    list order, roles by the GIN index (jsonb containment), e-mail prefixes by the pattern
    index, create_time bounds by the list-order index.
    """
    if where.impossible:
        return [false()]
    conditions: list[ColumnElement[bool]] = []
    if not where.show_deleted:
        conditions.append(users.c.state != UserState.DELETED.value)
    for state in sorted(s.value for s in where.states):
        conditions.append(users.c.state == state)
    for role in sorted(where.roles):
        if dialect == "postgresql":
            conditions.append(type_coerce(users.c.roles, JSONB).contains([role]))
        else:
            each = func.json_each(users.c.roles).table_valued("value")
            conditions.append(exists().where(each.c.value == literal(role)))
    if where.email is not None:
        conditions.append(users.c.email == where.email)
    for prefix in sorted(where.email_prefixes):
        conditions.append(users.c.email.like(_like_prefix(prefix), escape="\\"))
    for bound in where.create_after:
        conditions.append(
            users.c.create_time >= bound.value
            if bound.inclusive
            else users.c.create_time > bound.value
        )
    for bound in where.create_before:
        conditions.append(
            users.c.create_time <= bound.value
            if bound.inclusive
            else users.c.create_time < bound.value
        )
    for optional in where.optional_times:
        conditions.append(_optional_time_condition(optional))
    # Probes of user_labels' primary key (user_id, key) per candidate user, which keeps the
    # list-order index scan; or, when the planner finds a label rare, a read of
    # ix_user_labels_key_value joined back.
    for key, value in sorted(where.labels):
        conditions.append(_has_label(key, value))
    for key, value in sorted(where.labels_not):
        conditions.append(~_has_label(key, value))
    return conditions


def _has_label(key: str, value: str) -> ColumnElement[bool]:
    return exists().where(
        user_labels.c.user_id == users.c.id,
        user_labels.c.key == key,
        user_labels.c.value == value,
    )


_OPTIONAL_TIME_COLUMNS = {
    "last_login_time": users.c.last_login_time,
    "password_change_time": users.c.password_change_time,
}


def _optional_time_condition(optional: OptionalTimeBound) -> ColumnElement[bool]:
    """An unset (NULL) time is older than any: it satisfies < and <=, never > or >=. Each arm
    is served by the column's index (PostgreSQL combines them with a bitmap OR)."""
    column = _OPTIONAL_TIME_COLUMNS[optional.field]
    value, inclusive = optional.bound.value, optional.bound.inclusive
    if optional.before:
        return or_(column.is_(None), column <= value if inclusive else column < value)
    return column >= value if inclusive else column > value


def list_statement(
    *, limit: int, after: PageCursor | None, where: UserFilter, dialect: str
) -> Select[Any]:
    """One page of the list: the filter, strictly after the cursor, in list order. Unfiltered
    (or by e-mail) it is served by ix_users_create_time_id read backwards (or the e-mail's
    unique index), so page N costs what page 1 does (tests check the plans)."""
    stmt = select(users).where(*filter_conditions(where, dialect)).order_by(*_ORDER).limit(limit)
    if after is not None:
        stmt = stmt.where(
            tuple_(users.c.create_time, users.c.id) < tuple_(after.create_time, after.id)
        )
    return stmt


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
        token_version=m["token_version"],
        failed_login_count=m["failed_login_count"],
        locked_until=m["locked_until"],
        last_login_time=m["last_login_time"],
        password_change_time=m["password_change_time"],
        delete_time=m["delete_time"],
        purge_time=m["purge_time"],
        deleted_from_state=(
            UserState(m["deleted_from_state"]) if m["deleted_from_state"] is not None else None
        ),
        labels=m["labels"] or {},
        admin_metadata=m["admin_metadata"] or {},
        email_verified=bool(m["email_verified"]),
        password_change_required=bool(m["password_change_required"]),
    )


def _row_of(user: User, skeleton: str) -> dict[str, Any]:
    """The users row of a user (every column, so both insert paths write the same)."""
    return {
        "id": user.id,
        "email": user.email,
        "email_skeleton": skeleton,
        "name": user.name,
        "password_hash": user.password_hash,
        "roles": list(user.roles),
        "state": user.state.value,
        "create_time": user.create_time,
        "update_time": user.update_time,
        "version": user.version,
        "token_version": user.token_version,
        "failed_login_count": user.failed_login_count,
        "locked_until": user.locked_until,
        "last_login_time": user.last_login_time,
        "password_change_time": user.password_change_time,
        "delete_time": user.delete_time,
        "purge_time": user.purge_time,
        "deleted_from_state": user.deleted_from_state.value if user.deleted_from_state else None,
        "labels": dict(user.labels),
        "admin_metadata": dict(user.admin_metadata),
        "email_verified": user.email_verified,
        "password_change_required": user.password_change_required,
    }


def _label_rows(user_id: uuid.UUID, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"user_id": user_id, "key": k, "value": v} for k, v in sorted(labels.items())]


class UserRepository:
    """Reads and writes users on one connection (the unit of work's)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._dialect = conn.dialect.name

    async def _refuse_lookalike(self, email: str, skeleton: str, user_id: uuid.UUID) -> None:
        """EmailTaken or EmailLookalike if another user's address has this skeleton. The
        unique index on the skeleton settles races between two such writes."""
        row = (await self._conn.execute(_GET_BY_SKELETON, {"skeleton": skeleton})).first()
        if row is not None and row.id != user_id:
            raise EmailTaken() if row.email == email else EmailLookalike()

    async def add(self, user: User) -> None:
        skeleton = email_skeleton(user.email)
        insert_new = _INSERT_NEW.get(self._dialect)
        if insert_new is None:
            await self._refuse_lookalike(user.email, skeleton, user.id)
            await self._conn.execute(_INSERT, _row_of(user, skeleton))
        elif (await self._conn.execute(insert_new, _row_of(user, skeleton))).first() is None:
            await self._refuse_taken(user.email, skeleton, user.id)
        if user.labels:
            await self._conn.execute(_INSERT_LABELS, _label_rows(user.id, user.labels))

    async def _refuse_taken(self, email: str, skeleton: str, user_id: uuid.UUID) -> None:
        """Why an insert of this user did nothing: EmailTaken or EmailLookalike, as
        _refuse_lookalike would have said before it (a row without a skeleton, from before
        skeletons, still holds its e-mail). If the row in the way is gone already, the
        transaction runs again."""
        await self._refuse_lookalike(email, skeleton, user_id)
        if (await self._conn.execute(_GET_BY_EMAIL_ONLY, {"email": email})).first() is not None:
            raise EmailTaken()
        raise RetryableConflict("the user holding this e-mail went away; run again")

    async def add_many(self, users: Sequence[User]) -> None:
        """One COPY on PostgreSQL, one executemany elsewhere."""
        await insert_rows(
            self._conn,
            _USERS,
            [_row_of(user, email_skeleton(user.email)) for user in users],
        )
        await insert_rows(
            self._conn,
            user_labels,
            [row for user in users for row in _label_rows(user.id, user.labels)],
        )

    async def email_conflicts(self, emails: Collection[str]) -> dict[str, bool]:
        if not emails:
            return {}
        skeletons = {email: email_skeleton(email) for email in emails}
        stmt = _CONFLICTS_POSTGRESQL if self._dialect == "postgresql" else _CONFLICTS
        rows = (
            await self._conn.execute(
                stmt,
                {"emails": list(skeletons), "skeletons": list(set(skeletons.values()))},
            )
        ).all()
        taken = {row.email for row in rows}
        alike = {row.email_skeleton for row in rows}
        return {
            email: email in taken
            for email, skeleton in skeletons.items()
            if email in taken or skeleton in alike
        }

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        stmt = _GET_BY_ID_FOR_UPDATE if for_update else _GET_BY_ID
        row = (await self._conn.execute(stmt, {"id": user_id})).first()
        return _to_user(row) if row is not None else None

    async def get_by_email(self, email: str) -> User | None:
        row = (await self._conn.execute(_GET_BY_EMAIL, {"email": email})).first()
        return _to_user(row) if row is not None else None

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[User]:
        """The users among `user_ids` that exist, in no particular order; one statement."""
        if not user_ids:
            return []
        stmt = _GET_MANY_POSTGRESQL if self._dialect == "postgresql" else _GET_MANY
        rows = (await self._conn.execute(stmt, {"ids": list(user_ids)})).all()
        return [_to_user(r) for r in rows]

    async def list(
        self, *, limit: int, after: PageCursor | None, where: UserFilter
    ) -> Sequence[User]:
        """Up to `limit` users matching `where` in list order, strictly after `after`
        (keyset, no OFFSET): served by an index read in list order, so page N costs what
        page 1 does (tests check the plans)."""
        stmt = list_statement(limit=limit, after=after, where=where, dialect=self._dialect)
        rows = (await self._conn.execute(stmt)).all()
        return [_to_user(r) for r in rows]

    async def count(self, *, where: UserFilter, exact_below: int | None = None) -> int:
        if where == UserFilter() and exact_below is not None and self._dialect == "postgresql":
            estimate = (await self._conn.execute(_ESTIMATED_COUNT_PG)).scalar_one()
            if estimate is not None and estimate >= exact_below:
                return int(estimate)
        stmt = (
            select(func.count()).select_from(users).where(*filter_conditions(where, self._dialect))
        )
        return int((await self._conn.execute(stmt)).scalar_one())

    async def update(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        """Apply `values` and bump the version in one statement.

        With `expected_version`, the row changes only if its version still matches: the
        check and the write are one atomic UPDATE. `revoke_tokens` also bumps the token
        version, so access tokens issued before stop working. None when no row matched.
        """
        unknown = set(values) - WRITABLE_COLUMNS
        if unknown:
            raise ValueError(f"not writable: {sorted(unknown)}")
        stmt = update(users).where(users.c.id == user_id)
        if expected_version is not None:
            stmt = stmt.where(users.c.version == expected_version)
        bumps: dict[str, Any] = {"version": users.c.version + 1}
        if "email" in values:
            bumps["email_skeleton"] = email_skeleton(values["email"])
            await self._refuse_lookalike(values["email"], bumps["email_skeleton"], user_id)
        if revoke_tokens:
            bumps["token_version"] = users.c.token_version + 1
        stmt = stmt.values(**values, **bumps).returning(*users.c)
        row = (await self._conn.execute(stmt)).first()
        if row is None:
            return None
        if "labels" in values:
            # The searchable copy, in the same transaction (the users row is locked by now).
            await self._conn.execute(_DELETE_LABELS, {"user_id": user_id})
            if values["labels"]:
                await self._conn.execute(_INSERT_LABELS, _label_rows(user_id, values["labels"]))
        return _to_user(row)

    async def delete(self, user_id: uuid.UUID, *, expected_version: int | None = None) -> bool:
        stmt = delete(users).where(users.c.id == user_id)
        if expected_version is not None:
            stmt = stmt.where(users.c.version == expected_version)
        result = await self._conn.execute(stmt)
        return bool(result.rowcount)

    async def list_purgeable(self, *, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        """Ids of soft-deleted users whose purge time is at or before `now`, oldest first."""
        rows = (await self._conn.execute(_PURGEABLE, {"now": now, "limit": limit})).all()
        return [r[0] for r in rows]

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        """(token_version, state) of a user, or None when it does not exist."""
        row = (await self._conn.execute(_AUTH_STATE, {"id": user_id})).first()
        return (int(row[0]), UserState(row[1])) if row is not None else None

    async def record_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, max_failures: int, lock_until: datetime
    ) -> None:
        """Count one failed login atomically; the max_failures-th locks until lock_until.

        A currently locked account is left alone, so attempts during a lock do not extend it;
        after a lock expired, counting starts again from one.
        """
        expired = and_(users.c.locked_until.is_not(None), users.c.locked_until <= now)
        await self._conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .where(or_(users.c.locked_until.is_(None), users.c.locked_until <= now))
            .values(
                failed_login_count=case((expired, 1), else_=users.c.failed_login_count + 1),
                locked_until=case(
                    (expired, None),
                    (users.c.failed_login_count + 1 >= max_failures, lock_until),
                    else_=users.c.locked_until,
                ),
            )
        )

    async def replace_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        """Store a re-hash of the same password (new parameters); not a change of the user."""
        await self._conn.execute(
            update(users).where(users.c.id == user_id).values(password_hash=password_hash)
        )

    async def record_login_success(self, user_id: uuid.UUID, *, now: datetime) -> None:
        """A successful Login: last_login_time = now, failures and lock cleared; one statement,
        not a change of the user (no new version)."""
        await self._conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(last_login_time=now, failed_login_count=0, locked_until=None)
        )

    async def dormant(self, *, cutoff: datetime, limit: int) -> Sequence[User]:
        """Up to `limit` active users that can log in with a password and whose last login, or
        creation if they never logged in, is before `cutoff`; oldest creation first."""
        stmt = (
            select(users)
            .where(users.c.state == UserState.ACTIVE.value)
            .where(users.c.password_hash != SERVICE_ACCOUNT_PASSWORD_HASH)
            .where(
                or_(
                    users.c.last_login_time < cutoff,
                    and_(users.c.last_login_time.is_(None), users.c.create_time < cutoff),
                )
            )
            .order_by(users.c.create_time, users.c.id)
            .limit(limit)
        )
        rows = (await self._conn.execute(stmt)).all()
        return [_to_user(r) for r in rows]

    async def reset_login_failures(self, user_id: uuid.UUID) -> None:
        await self._conn.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(failed_login_count=0, locked_until=None)
        )
