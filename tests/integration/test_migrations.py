"""The migrations build exactly the schema the tables describe, and run down and up again."""

from __future__ import annotations

import ast
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    insert,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from tests.conftest import BACKENDS
from tests.support import sync_engine, throwaway_database, throwaway_sqlite
from usersvc.adapters.tables import belongs_to, metadata
from usersvc.adapters.user_repository import list_statement
from usersvc.domain.user_filter import parse_filter
from usersvc.migrate import downgrade, migrations_dir, upgrade


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database without any schema, on each backend."""
    if request.param == "sqlite":
        with throwaway_sqlite(migrated=False) as url:
            yield url
    else:
        admin_url: str = request.getfixturevalue("postgres_admin_url")
        with throwaway_database(admin_url, migrated=False) as url:
            yield url


def schema_diff(url: str, target: MetaData = metadata) -> list[Any]:
    """What autogenerate would write to make the database match the tables (types and
    server defaults included); empty when they agree."""
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "render_as_batch": conn.dialect.name == "sqlite",
                    "include_object": lambda obj, *_: belongs_to(obj, conn.dialect.name),
                },
            )
            diff: list[Any] = compare_metadata(context, target)
            return diff
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = sync_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_the_tables_and_the_round_trip_returns_to_it(empty_database: str) -> None:
    upgrade(empty_database)
    assert schema_diff(empty_database) == []
    assert table_names(empty_database) >= {t.name for t in metadata.sorted_tables}

    downgrade(empty_database, "base")
    assert table_names(empty_database) <= {"alembic_version"}

    upgrade(empty_database)
    assert schema_diff(empty_database) == []


def test_the_comparison_sees_a_server_default_the_tables_do_not_have(
    empty_database: str,
) -> None:
    # Tables without the defaults 0003 and 0012 created must differ from the migrated database
    # in exactly those columns, or the comparison above proves nothing about defaults.
    upgrade(empty_database)
    without_defaults = MetaData()
    for table in metadata.sorted_tables:
        copy = table.to_metadata(without_defaults)
        for column in copy.columns:
            column.server_default = None
    changed = sorted(
        (entry[0][0], entry[0][3])
        for entry in schema_diff(empty_database, without_defaults)
        if isinstance(entry, list)
    )
    assert changed == [
        ("modify_default", "email_verified"),
        ("modify_default", "failed_attempts"),
        ("modify_default", "failed_login_count"),
        ("modify_default", "password_change_required"),
        ("modify_default", "token_version"),
    ]


def test_migrations_import_no_application_code() -> None:
    """A revision is history: importing live types would let a code change rewrite it."""
    offenders = []
    for path in sorted((migrations_dir() / "versions").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "usersvc"]
    assert offenders == []
    assert len(list(Path(migrations_dir(), "versions").glob("0*.py"))) >= 4


def test_login_times_arrive_unset_on_existing_users_and_filter_as_the_oldest(
    empty_database: str,
) -> None:
    """Migration 0008 adds last_login_time and password_change_time without inventing values
    for existing users: unset, which the filter treats as older than any time."""
    upgrade(empty_database, "0007")
    user_id = uuid.uuid4()
    engine = sync_engine(empty_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(users_before_0008(conn.dialect.name)),
                {
                    "id": user_id,
                    "email": "old@example.com",
                    "name": "Old User",
                    "password_hash": "$argon2id$old",
                    "roles": [],
                    "state": "active",
                    "create_time": datetime(2020, 1, 1),
                    "update_time": datetime(2020, 1, 1),
                    "version": 1,
                },
            )
        upgrade(empty_database)
        where = parse_filter("last_login_time < 2000-01-01T00:00:00Z")
        with engine.connect() as conn:
            rows = conn.execute(
                list_statement(limit=10, after=None, where=where, dialect=conn.dialect.name)
            ).all()
            none_after = conn.execute(
                list_statement(
                    limit=10,
                    after=None,
                    where=parse_filter("password_change_time >= 1900-01-01T00:00:00Z"),
                    dialect=conn.dialect.name,
                )
            ).all()
        assert [(r.id, r.last_login_time, r.password_change_time) for r in rows] == [
            (user_id, None, None)
        ]
        assert none_after == []
        downgrade(empty_database, "0007")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM users")).scalar_one() == 1
    finally:
        engine.dispose()


def users_before_0008(dialect: str) -> Table:
    """The users table as 0007 left it (the columns this test writes)."""
    roles = JSONB() if dialect == "postgresql" else JSON()
    return Table(
        "users",
        MetaData(),
        Column("id", Uuid()),
        Column("email", String()),
        Column("name", String()),
        Column("password_hash", Text()),
        Column("roles", roles),
        Column("state", String()),
        Column("create_time", DateTime()),
        Column("update_time", DateTime()),
        Column("version", Integer()),
    )
