"""Soft delete (AIP-164): delete_time, purge_time, deleted_from_state, purge-time index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("purge_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_from_state", sa.String(16), nullable=True))
    op.create_index("ix_users_purge_time", "users", ["purge_time"])


def downgrade() -> None:
    # Soft-deleted rows would otherwise come back as users in an unknown state.
    op.execute("DELETE FROM users WHERE state = 'deleted'")
    op.drop_index("ix_users_purge_time", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("deleted_from_state")
        batch.drop_column("purge_time")
        batch.drop_column("delete_time")
