"""User labels (indexed in user_labels) and admin metadata.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here: the migration never imports live code.
_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        # NULL (every existing row) reads as no labels, no metadata.
        batch.add_column(sa.Column("labels", _JSON, nullable=True))
        batch.add_column(sa.Column("admin_metadata", _JSON, nullable=True))
    op.create_table(
        "user_labels",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.String(63), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name="fk_user_labels_user_id_users",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "key", name="pk_user_labels"),
    )
    op.create_index("ix_user_labels_key_value", "user_labels", ["key", "value"])


def downgrade() -> None:
    op.drop_index("ix_user_labels_key_value", table_name="user_labels")
    op.drop_table("user_labels")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("admin_metadata")
        batch.drop_column("labels")
