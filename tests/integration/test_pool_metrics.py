"""The pool gauges follow real checkouts, on both databases."""

from __future__ import annotations

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
