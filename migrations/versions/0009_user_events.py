"""The change feed of users (WatchUserEvents): user_events and, on PostgreSQL, its sequence.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        # Taken explicitly by the writer after its transaction id exists (see the repository).
        op.execute("CREATE SEQUENCE user_events_seq AS bigint")
    op.create_table(
        "user_events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            autoincrement=False,
        ),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("user", JSON, nullable=False),
        sa.Column("changed_fields", JSON, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_user_events"),
        # SQLite: AUTOINCREMENT never hands out a number again, even after a purge.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_user_events_create_time", "user_events", ["create_time"])
    if postgres:
        op.execute("ALTER SEQUENCE user_events_seq OWNED BY user_events.seq")


def downgrade() -> None:
    op.drop_index("ix_user_events_create_time", table_name="user_events")
    op.drop_table("user_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE IF EXISTS user_events_seq")
