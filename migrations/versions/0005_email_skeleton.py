"""E-mail confusable skeletons (Unicode TS #39), unique: look-alike addresses cannot coexist.

Existing accounts whose skeletons collide keep their addresses: every one after the oldest
gets no skeleton (NULL, which the unique index allows) and is named in a warning.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import logging
from collections.abc import Sequence

import icu
import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    op.add_column("users", sa.Column("email_skeleton", sa.String(1024), nullable=True))
    users = sa.table(
        "users",
        sa.column("id", sa.Uuid()),
        sa.column("email", sa.String()),
        sa.column("email_skeleton", sa.String()),
        sa.column("create_time"),
    )
    checker = icu.SpoofChecker()
    conn = op.get_bind()
    seen: set[str] = set()
    rows = conn.execute(
        sa.select(users.c.id, users.c.email).order_by(users.c.create_time, users.c.id)
    ).all()
    for user_id, email in rows:
        skeleton = str(checker.getSkeleton(0, email))
        if skeleton in seen:
            log.warning("user %s has a look-alike e-mail of an older account; kept", user_id)
            continue
        seen.add(skeleton)
        conn.execute(sa.update(users).where(users.c.id == user_id).values(email_skeleton=skeleton))
    op.create_index("ix_users_email_skeleton", "users", ["email_skeleton"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_users_email_skeleton", table_name="users")
    op.drop_column("users", "email_skeleton")
