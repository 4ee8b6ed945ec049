"""Every ListUsers filter, first page and keyset page, is served by an index on PostgreSQL.

At 100,000 users, seeded with one INSERT ... SELECT generate_series, the plans of the very
statements the repository sends (bound parameters included) must read through an index and
never scan the whole table.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Select, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from tests.support import sync_engine, throwaway_database
from usersvc.adapters.user_repository import list_statement
from usersvc.domain.models import PageCursor
from usersvc.domain.user_filter import parse_filter

USERS = 100_000
START = datetime(2026, 1, 1, tzinfo=UTC)
# 0.1% admins, 10% services, 5% disabled; one user a second from START; 1% never logged in,
# the others logged in at their creation time.
SEED = f"""
INSERT INTO users (id, email, name, password_hash, roles, state, create_time, update_time,
                   version, last_login_time)
SELECT gen_random_uuid(), 'user' || g || '@example.com', 'User ' || g, '$argon2id$plan',
       CASE WHEN g % 1000 = 0 THEN '["admin"]'::jsonb
            WHEN g % 10 = 0 THEN '["service"]'::jsonb
            ELSE '[]'::jsonb END,
       CASE WHEN g % 20 = 7 THEN 'disabled' ELSE 'active' END,
       timestamptz '{START.isoformat()}' + g * interval '1 second',
       timestamptz '{START.isoformat()}' + g * interval '1 second',
       1,
       CASE WHEN g % 100 = 3 THEN NULL
            ELSE timestamptz '{START.isoformat()}' + g * interval '1 second' END
FROM generate_series(1, {USERS}) AS g
"""
# Every user has a label "team" (ten values, so each matches 10%); one in 5,000 has
# "project" = "apollo".
SEED_LABELS = """
INSERT INTO user_labels (user_id, key, value)
SELECT id, 'team', 't' || (substr(email, 5, length(email) - 16)::int % 10) FROM users
UNION ALL
SELECT id, 'project', 'apollo' FROM users
WHERE substr(email, 5, length(email) - 16)::int % 5000 = 0
"""
INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


@pytest.fixture(scope="module")
def big_directory(postgres_admin_url: str) -> Iterator[Engine]:
    with throwaway_database(postgres_admin_url) as url:
        engine = sync_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(text(SEED))
                conn.execute(text(SEED_LABELS))
            with engine.connect() as conn:
                autocommit = conn.execution_options(isolation_level="AUTOCOMMIT")
                autocommit.execute(text("ANALYZE users"))
                autocommit.execute(text("ANALYZE user_labels"))
            yield engine
        finally:
            engine.dispose()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


class Explain(Executable, ClauseElement):
    """EXPLAIN of a statement, its parameters bound and processed as the repository's are."""

    inherit_cache = False

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + str(compiler.process(element.statement, **kw))


def _plan(db: Engine, source: str, after: PageCursor | None) -> list[Any]:
    stmt = list_statement(limit=51, after=after, where=parse_filter(source), dialect="postgresql")
    with db.connect() as conn:
        plan = conn.execute(Explain(stmt)).scalar_one()
    return list(_nodes(plan[0]["Plan"]))


MIDDLE = START + timedelta(seconds=USERS // 2)
EARLY = START + timedelta(seconds=USERS // 100)
LATE = START + timedelta(seconds=USERS - USERS // 100)


@pytest.mark.parametrize(
    ("source", "indexes"),
    [
        ("", {"ix_users_create_time_id"}),
        ("state = DISABLED", {"ix_users_state_create_time_id"}),
        ("state = ACTIVE", {"ix_users_state_create_time_id", "ix_users_create_time_id"}),
        ('roles:"admin"', {"ix_users_roles"}),
        ('roles:"service"', {"ix_users_roles", "ix_users_create_time_id"}),
        # Eleven users: the prefix index, thanks to the finer statistics of migration 0007.
        ('email:"user4242*"', {"ix_users_email_prefix", "uq_users_email"}),
        ("email = user4242@example.com", {"uq_users_email", "ix_users_email_prefix"}),
        (f"create_time > {MIDDLE.isoformat()}", {"ix_users_create_time_id"}),
        (f"create_time >= {MIDDLE.isoformat()}", {"ix_users_create_time_id"}),
        (f"create_time < {MIDDLE.isoformat()}", {"ix_users_create_time_id"}),
        (f"create_time <= {MIDDLE.isoformat()}", {"ix_users_create_time_id"}),
        # Never-logged-in users match "<" too (NULL OR <): a bitmap OR on the column's index,
        # or the list order when the matches are dense enough.
        (
            f"last_login_time < {EARLY.isoformat()}",
            {"ix_users_last_login_time", "ix_users_create_time_id"},
        ),
        (
            f"last_login_time <= {MIDDLE.isoformat()}",
            {"ix_users_last_login_time", "ix_users_create_time_id"},
        ),
        (
            f"last_login_time > {LATE.isoformat()}",
            {"ix_users_last_login_time", "ix_users_create_time_id"},
        ),
        (
            f"state = ACTIVE AND last_login_time < {EARLY.isoformat()}",
            {
                "ix_users_last_login_time",
                "ix_users_state_create_time_id",
                "ix_users_create_time_id",
            },
        ),
        (
            f'state = ACTIVE AND roles:"admin" AND create_time < {MIDDLE.isoformat()}',
            {"ix_users_roles", "ix_users_state_create_time_id", "ix_users_create_time_id"},
        ),
        # A common label: the list order, probing user_labels' primary key per user.
        ('labels.team = "t3"', {"ix_users_create_time_id", "pk_user_labels"}),
        ('labels.team != "t3"', {"ix_users_create_time_id", "pk_user_labels"}),
        # A rare one: its rows through (key, value), then the users by id.
        ('labels.project = "apollo"', {"ix_user_labels_key_value"}),
        (
            f'state = ACTIVE AND labels.team = "t3" AND create_time < {MIDDLE.isoformat()}',
            {"ix_users_state_create_time_id", "ix_users_create_time_id", "pk_user_labels"},
        ),
    ],
)
@pytest.mark.parametrize("page", ["first", "keyset"])
def test_each_filter_reads_through_an_index(
    big_directory: Engine, source: str, indexes: set[str], page: str
) -> None:
    after = (
        PageCursor(create_time=MIDDLE + timedelta(seconds=USERS // 4), id=uuid.UUID(int=0))
        if page == "keyset"
        else None
    )
    nodes = _plan(big_directory, source, after)
    kinds = [n["Node Type"] for n in nodes]
    used = {n.get("Index Name") for n in nodes if n["Node Type"] in INDEX_SCANS}
    assert "Seq Scan" not in kinds, (source, kinds)
    assert used & indexes, (source, used, kinds)
