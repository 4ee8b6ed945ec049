"""Indexes for ListUsers.filter: state, roles (GIN, PostgreSQL), e-mail prefix (PostgreSQL).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_users_state_create_time_id", "users", ["state", "create_time", "id"])
    if op.get_bind().dialect.name == "postgresql":
        # roles is jsonb there: `roles @> '["admin"]'` is served by this index.
        op.create_index(
            "ix_users_roles",
            "users",
            ["roles"],
            postgresql_using="gin",
            postgresql_ops={"roles": "jsonb_path_ops"},
        )
        # LIKE 'prefix%' cannot use the unique e-mail index under a non-C collation.
        op.create_index(
            "ix_users_email_prefix",
            "users",
            ["email"],
            postgresql_ops={"email": "varchar_pattern_ops"},
        )
        # A finer histogram, so a rare prefix is estimated as rare and read through the prefix
        # index, not through the list order filtering row by row (default: 100 buckets).
        op.execute("ALTER TABLE users ALTER COLUMN email SET STATISTICS 1000")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE users ALTER COLUMN email SET STATISTICS -1")
        op.drop_index("ix_users_email_prefix", table_name="users")
        op.drop_index("ix_users_roles", table_name="users")
    op.drop_index("ix_users_state_create_time_id", table_name="users")
