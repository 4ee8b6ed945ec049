"""SQLAlchemy Core tables: the schema the migrations create and the repositories query."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ISO text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonList = JSON().with_variant(JSONB(), "postgresql")

users = Table(
    "users",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("name", String(100), nullable=False),
    Column("password_hash", Text(), nullable=False),
    Column("roles", JsonList, nullable=False),
    Column("state", String(16), nullable=False),
    Column("create_time", UTCDateTime(), nullable=False),
    Column("update_time", UTCDateTime(), nullable=False),
    # Bumped on every change; the etag is derived from it.
    Column("version", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    # Server defaults as migration 0003 created them (it backfilled existing rows with them).
    Column(
        "token_version",
        BigInteger().with_variant(Integer(), "sqlite"),
        nullable=False,
        server_default="1",
    ),
    Column("failed_login_count", Integer(), nullable=False, server_default="0"),
    Column("locked_until", UTCDateTime(), nullable=True),
    # Unicode TS #39 skeleton of the e-mail: look-alike addresses cannot coexist. NULL only
    # for accounts older than the rule whose address collided with an even older one.
    Column("email_skeleton", String(1024), nullable=True),
    # Migration 0008. NULL: never logged in / password set before the column existed.
    Column("last_login_time", UTCDateTime(), nullable=True),
    Column("password_change_time", UTCDateTime(), nullable=True),
    # Soft delete (migration 0010): set while state is "deleted". The row, and so the unique
    # e-mail, stays until purge_time; deleted_from_state is what UndeleteUser restores.
    Column("delete_time", UTCDateTime(), nullable=True),
    Column("purge_time", UTCDateTime(), nullable=True),
    Column("deleted_from_state", String(16), nullable=True),
    # Migration 0011. labels: {key: value}, what every read returns (user_labels below is its
    # index for ListUsers.filter, written with it). admin_metadata: a bounded JSON object for
    # admins. NULL (rows older than the columns) reads as {}.
    Column("labels", JsonList, nullable=True),
    Column("admin_metadata", JsonList, nullable=True),
    # Migration 0012: set by VerifyEmail, reset by every change of the e-mail.
    Column("email_verified", Boolean(), nullable=False, server_default=false()),
    # Set by admins; cleared by the user's own ChangePassword or a RecoverPassword.
    Column("password_change_required", Boolean(), nullable=False, server_default=false()),
    # The list order (newest first, id as tiebreaker) served by one index scan; also the
    # create_time bounds of ListUsers.filter.
    Index("ix_users_create_time_id", "create_time", "id"),
    Index("ix_users_email_skeleton", "email_skeleton", unique=True),
    # filter `state = ...` in list order.
    Index("ix_users_state_create_time_id", "state", "create_time", "id"),
    # filter `last_login_time < ...` (and the dormant-account job), `password_change_time`.
    Index("ix_users_last_login_time", "last_login_time"),
    Index("ix_users_password_change_time", "password_change_time"),
    # The purge job's scan for deleted users past their purge time.
    Index("ix_users_purge_time", "purge_time"),
)


def _postgresql_only(index: Index) -> Index:
    """An index PostgreSQL has and SQLite does not (migration 0007 creates it there only)."""
    index.info["dialect"] = "postgresql"
    return index.ddl_if(dialect="postgresql")


# filter `roles:"admin"`: jsonb containment (roles @> '["admin"]') through a GIN index.
_postgresql_only(
    Index(
        "ix_users_roles",
        users.c.roles,
        postgresql_using="gin",
        postgresql_ops={"roles": "jsonb_path_ops"},
    )
)
# filter `email:"ada*"`: LIKE 'ada%' needs pattern ops under a non-C collation.
_postgresql_only(
    Index("ix_users_email_prefix", users.c.email, postgresql_ops={"email": "varchar_pattern_ops"})
)


# The labels of each user, one row per label, kept equal to users.labels by the repository in
# the same statement batch that writes the column. It is there to be searched: filter
# `labels.team = "billing"` is an EXISTS probe on the primary key for each user in list order,
# or, for a rare label, a read of ix_user_labels_key_value; on both databases.
user_labels = Table(
    "user_labels",
    metadata,
    Column("user_id", Uuid(), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(63), primary_key=True),
    Column("value", String(63), nullable=False),
    Index("ix_user_labels_key_value", "key", "value"),
)


def belongs_to(obj: object, dialect: str) -> bool:
    """Whether a schema object exists on `dialect` (for comparing the migrations with these
    tables: an index declared for PostgreSQL only is no difference on SQLite)."""
    info = getattr(obj, "info", None) or {}
    wanted = info.get("dialect")
    return wanted is None or wanted == dialect


# Transactional outbox: written in the same transaction as the change it announces, delivered
# later by the dispatcher. Rows are claimed with a lease (claimed_until) so a crashed
# dispatcher's rows become due again.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("topic", String(64), nullable=False),
    Column("aggregate_id", Uuid(), nullable=False),
    Column("payload", JsonList, nullable=False),
    Column("request_id", String(128), nullable=False),
    # pending -> delivered | failed | skipped (OutboxStatus)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer(), nullable=False),
    Column("next_attempt_time", UTCDateTime(), nullable=False),
    Column("claimed_until", UTCDateTime(), nullable=True),
    Column("last_error", Text(), nullable=True),
    Column("create_time", UTCDateTime(), nullable=False),
    Column("update_time", UTCDateTime(), nullable=False),
    # W3C traceparent of the call that wrote the row; the delivery span links to it.
    Column("trace_context", String(128), nullable=True),
    Index("ix_outbox_status_next_attempt_time", "status", "next_attempt_time"),
)

# Refresh tokens are stored only as SHA-256 hashes. A family is every token descended from one
# login; reuse of a used token revokes the family.
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user_id", Uuid(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("family_id", Uuid(), nullable=False),
    # active -> used | revoked (RefreshTokenStatus)
    Column("status", String(16), nullable=False),
    Column("create_time", UTCDateTime(), nullable=False),
    Column("expire_time", UTCDateTime(), nullable=False),
    Index("ix_refresh_tokens_family_id", "family_id"),
    Index("ix_refresh_tokens_user_id", "user_id"),
)

# Audit trail: append-only (AuditRepository has no update or delete), with one sanctioned
# rewrite: purging a soft-deleted user tombstones the e-mail and name values in its events.
# No foreign key to users, so records survive the user's deletion.
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("user_id", Uuid(), nullable=True),
    Column("action", String(64), nullable=False),
    Column("changes", JsonList, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("create_time", UTCDateTime(), nullable=False),
    Index("ix_audit_events_user_id_create_time_id", "user_id", "create_time", "id"),
    Index("ix_audit_events_create_time_id", "create_time", "id"),
)

# Idempotent CreateUser: one row per (caller, request_id), written in the creating transaction,
# holding a fingerprint of the request and the public fields of the created user.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("caller", String(64), primary_key=True),
    Column("request_id", String(64), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("result", JsonList, nullable=False),
    Column("create_time", UTCDateTime(), nullable=False),
    Index("ix_idempotency_keys_create_time", "create_time"),
)

# The change feed (WatchUserEvents): one row per committed change of a user, written in the
# transaction of the change. `seq` orders the feed: on PostgreSQL from the sequence
# user_events_seq (the repository takes it explicitly, see user_event_repository), on SQLite
# from AUTOINCREMENT (never reused, even after the newest rows are purged). No foreign key to
# users: the event of a deletion outlives the user. Rows older than the retention are purged.
user_events = Table(
    "user_events",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("user_id", Uuid(), nullable=False),
    Column("type", String(32), nullable=False),
    # The user after the change (public fields only, never a hash).
    Column("user", JsonList, nullable=False),
    Column("changed_fields", JsonList, nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("create_time", UTCDateTime(), nullable=False),
    Index("ix_user_events_create_time", "create_time"),
    sqlite_autoincrement=True,
)

# One-time codes mailed to users (e-mail verification; password recovery): only the SHA-256 of
# each code is stored. A code is usable while used_time is NULL and expire_time lies ahead;
# redeeming sets used_time in one conditional UPDATE, so a code works at most once even when
# two calls race. A new code of the same purpose sets used_time of the older unused ones, and
# failed_attempts burns the outstanding code after a few wrong tries. Rows go with their user.
one_time_codes = Table(
    "one_time_codes",
    metadata,
    Column("id", Uuid(), primary_key=True),
    Column("user_id", Uuid(), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # CodePurpose
    Column("purpose", String(32), nullable=False),
    Column("code_hash", String(64), nullable=False, unique=True),
    # The address the code was mailed to.
    Column("email", String(254), nullable=False),
    Column("failed_attempts", Integer(), nullable=False, server_default="0"),
    Column("create_time", UTCDateTime(), nullable=False),
    Column("expire_time", UTCDateTime(), nullable=False),
    Column("used_time", UTCDateTime(), nullable=True),
    Index("ix_one_time_codes_user_id_purpose", "user_id", "purpose"),
)
