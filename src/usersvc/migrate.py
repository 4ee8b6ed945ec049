"""Alembic migrations, run programmatically (no alembic.ini needed)."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config


def migrations_dir() -> Path:
    """USERSVC_MIGRATIONS_DIR; else the copy an installed wheel ships inside the package;
    else the repository's `migrations/` (an editable install or a checkout)."""
    configured = os.environ.get("USERSVC_MIGRATIONS_DIR")
    if configured:
        return Path(configured)
    packaged = Path(__file__).resolve().parent / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to run on every start."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Take the schema back to `revision` ("base": nothing)."""
    command.downgrade(alembic_config(database_url), revision)


def script_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(head revisions, every revision) of the migrations this code ships."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(migrations_dir()))
    every = frozenset(rev.revision for rev in script.walk_revisions())
    return frozenset(script.get_heads()), every
