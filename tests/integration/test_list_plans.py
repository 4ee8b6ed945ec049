"""ListUsers on a large PostgreSQL table: the plans that keep deep pages as cheap as the first,
and total_size that is exact where it can be and an estimate where a COUNT would cost more
than the page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import bulk_insert_users, sync_engine, throwaway_database
from usersvc.adapters.db import create_engine
from usersvc.adapters.point_reads import LIST_AFTER_PG, LIST_FIRST_PG
from usersvc.adapters.tables import users
from usersvc.adapters.user_repository import UserRepository, list_statement
from usersvc.domain.models import PageCursor
from usersvc.domain.user_filter import UserFilter
from usersvc.services.users import EXACT_COUNT_BELOW

ROWS = 100_000
PAGE = 51  # a page of 50 and one more row to know whether another page follows


@pytest.fixture(scope="module")
def large_url(postgres_admin_url: str) -> Iterator[str]:
    with throwaway_database(postgres_admin_url) as url:
        bulk_insert_users(url, ROWS)
        yield url


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _explain(url: str, stmt: Any) -> list[dict[str, Any]]:
    """EXPLAIN ANALYZE of the statement exactly as the repository sends it."""
    engine = sync_engine(url)
    compiled = stmt.compile(dialect=engine.dialect)
    try:
        with engine.connect() as conn:
            raw = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + str(compiled), compiled.params
            ).scalar_one()
    finally:
        engine.dispose()
    document = json.loads(raw) if isinstance(raw, str) else raw
    return list(_nodes(document[0]["Plan"]))


def _cursor_at(url: str, depth: float) -> PageCursor:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                select(users.c.create_time, users.c.id)
                .order_by(users.c.create_time.desc(), users.c.id.desc())
                .offset(int(ROWS * depth))
                .limit(1)
            ).one()
    finally:
        engine.dispose()
    return PageCursor(create_time=row.create_time, id=row.id)


@pytest.mark.parametrize("depth", [None, 0.5, 0.95])
def test_a_page_at_any_depth_reads_one_page_of_the_keyset_index(
    large_url: str, depth: float | None
) -> None:
    after = _cursor_at(large_url, depth) if depth is not None else None
    nodes = _explain(
        large_url, list_statement(limit=PAGE, after=after, where=UserFilter(), dialect="postgresql")
    )
    kinds = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in kinds and "Sort" not in kinds, kinds
    scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert [s["Index Name"] for s in scans] == ["ix_users_create_time_id"]
    assert scans[0]["Scan Direction"] == "Backward"
    # The keyset condition is an index condition: the scan starts at the cursor and stops
    # after one page, whatever the depth.
    if after is not None:
        assert "create_time" in scans[0]["Index Cond"]
    assert scans[0]["Actual Rows"] <= PAGE


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("depth", [None, 0.95])
async def test_the_point_read_page_reads_one_page_of_the_keyset_index(
    large_url: str, depth: float | None, plan_cache_mode: str
) -> None:
    """ListUsers' fast path sends fixed SQL as prepared statements: after a few runs
    PostgreSQL may plan them once for any parameters (a generic plan). Both kinds of plan
    read one page of the index, backwards."""
    after = _cursor_at(large_url, depth) if depth is not None else None
    args: tuple[Any, ...] = (PAGE,) if after is None else (PAGE, after.create_time, after.id)
    sql = LIST_FIRST_PG if after is None else LIST_AFTER_PG
    dsn = make_url(large_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        raw = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, *args)
        assert len(await conn.fetch(sql, *args)) == PAGE
    finally:
        await conn.close()
    nodes = list(_nodes(json.loads(raw)[0]["Plan"]))
    kinds = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in kinds and "Sort" not in kinds, kinds
    scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert [s["Index Name"] for s in scans] == ["ix_users_create_time_id"]
    assert scans[0]["Scan Direction"] == "Backward"
    if after is not None:
        assert "create_time" in scans[0]["Index Cond"]
    assert scans[0]["Actual Rows"] <= PAGE


@pytest.mark.parametrize("depth", [None, 0.95])
def test_a_page_filtered_by_email_reads_the_email_index(
    large_url: str, depth: float | None
) -> None:
    after = _cursor_at(large_url, depth) if depth is not None else None
    email = f"bulk-{int(ROWS * 0.97)}@example.com"
    nodes = _explain(
        large_url,
        list_statement(
            limit=PAGE, after=after, where=UserFilter(email=email), dialect="postgresql"
        ),
    )
    kinds = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in kinds, kinds
    scans = [n for n in nodes if "Index Name" in n]
    # Either e-mail index serves equality (migration 0007 added the prefix pattern index).
    assert len(scans) == 1
    assert scans[0]["Index Name"] in ("uq_users_email", "ix_users_email_prefix")
    assert all(s["Actual Rows"] <= 1 for s in scans)


async def _counts(url: str) -> tuple[int, int, int, int, int, int]:
    engine: AsyncEngine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            repo = UserRepository(conn)
            estimated = await repo.count(where=UserFilter(), exact_below=EXACT_COUNT_BELOW)
            exact = await repo.count(where=UserFilter())
            one = await repo.count(
                where=UserFilter(email="bulk-17@example.com"), exact_below=EXACT_COUNT_BELOW
            )
            none = await repo.count(
                where=UserFilter(email="nobody@example.com"), exact_below=EXACT_COUNT_BELOW
            )
            # A filter matching every row is still counted, never estimated.
            prefixed = await repo.count(
                where=UserFilter(email_prefixes=frozenset({"bulk-"})), exact_below=EXACT_COUNT_BELOW
            )
            prefixed_sql = (
                await conn.execute(
                    select(func.count()).select_from(users).where(users.c.email.like("bulk-%"))
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    return estimated, exact, one, none, prefixed, prefixed_sql


async def test_total_size_is_estimated_when_large_and_exact_when_filtered(
    large_url: str,
) -> None:
    estimated, exact, one, none, prefixed, prefixed_sql = await _counts(large_url)
    assert exact == ROWS
    assert abs(estimated - ROWS) <= ROWS * 0.05
    assert (one, none) == (1, 0)
    assert prefixed == prefixed_sql


async def test_total_size_is_exact_on_a_small_table(postgres_url: str) -> None:
    engine = create_engine(postgres_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            repo = UserRepository(conn)
            # The default list leaves soft-deleted users out; so does its exact count.
            exact = (
                await conn.execute(
                    select(func.count()).select_from(users).where(users.c.state != "deleted")
                )
            ).scalar_one()
            assert exact < EXACT_COUNT_BELOW
            assert await repo.count(where=UserFilter(), exact_below=EXACT_COUNT_BELOW) == exact
    finally:
        await engine.dispose()
