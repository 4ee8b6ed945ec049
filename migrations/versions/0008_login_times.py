"""Last login and password change times, with the indexes ListUsers.filter uses on them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: existing users have never logged in since the column exists, and
    # when their password was last set is unknown; the filter treats NULL as older than any time.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("last_login_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("password_change_time", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_index("ix_users_last_login_time", "users", ["last_login_time"])
    op.create_index("ix_users_password_change_time", "users", ["password_change_time"])


def downgrade() -> None:
    op.drop_index("ix_users_password_change_time", table_name="users")
    op.drop_index("ix_users_last_login_time", table_name="users")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("password_change_time")
        batch.drop_column("last_login_time")
