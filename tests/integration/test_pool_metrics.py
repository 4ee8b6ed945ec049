"""The pool gauges follow real checkouts, on both databases."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy import text

from tests.tcp_proxy import proxied_database
from usersvc.metrics import Metrics


async def test_pool_gauges_follow_checkouts(database_url: str) -> None:
    from usersvc.adapters.db import create_engine

    metrics = Metrics()
    engine = create_engine(database_url, pool_size=3)
    metrics.watch_pool("primary", engine)
    labels = {"pool": "primary"}

    def in_use() -> float | None:
        return metrics.registry.get_sample_value("usersvc_db_pool_connections_in_use", labels)

    try:
        assert metrics.registry.get_sample_value("usersvc_db_pool_size", labels) == 3
        async with engine.connect():
            assert in_use() == 1
            async with engine.connect():
                assert in_use() == 2
        assert in_use() == 0
    finally:
        await engine.dispose()


async def test_checkouts_cut_short_leave_the_gauge_at_zero(postgres_url: str) -> None:
    """Checkouts and statements ended by a deadline while the database hangs: SQLAlchemy
    reports such connections returned even when it never reported them taken, and the
    gauge must not count below zero."""
    from usersvc.adapters.db import create_engine

    gauge = "usersvc_db_pool_connections_in_use"
    with proxied_database(postgres_url) as (proxy, url):
        metrics = Metrics()
        engine = create_engine(url, pool_size=2)
        metrics.watch_pool("primary", engine)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            proxy.pause()
            for _ in range(2):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3), engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
            proxy.resume()
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                assert metrics.registry.get_sample_value(gauge, {"pool": "primary"}) == 1
            assert metrics.registry.get_sample_value(gauge, {"pool": "primary"}) == 0
        finally:
            await engine.dispose()
