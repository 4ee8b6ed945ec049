"""Fixtures shared by every test: databases on both backends and a real server."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from tests.audit_scan import scan
from tests.support import postgres_server, throwaway_database, throwaway_sqlite

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with postgres_server() as (url, why_not):
        if url is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"PostgreSQL tests cannot run in CI: {why_not}")
            pytest.skip(why_not)
        yield url


def _no_secret_in_the_audit_trail(url: str) -> None:
    """Session finalizer: after every test that used the database, no audit row it wrote may
    hold a password, hash or token of the suite."""
    count, problems = scan(url)
    if problems:
        shown = "\n".join(problems[:20])
        pytest.fail(f"{len(problems)} secrets in {count} audit rows:\n{shown}", pytrace=False)


@pytest.fixture(scope="session")
def sqlite_url() -> Iterator[str]:
    with throwaway_sqlite() as url:
        yield url
        _no_secret_in_the_audit_trail(url)


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    with throwaway_database(postgres_admin_url) as url:
        yield url
        _no_secret_in_the_audit_trail(url)


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated database, once per backend for the whole session."""
    url: str = request.getfixturevalue(
        {"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param]
    )
    return url


@pytest.fixture(autouse=True, scope="session")
def _log_level() -> None:
    logging.getLogger("usersvc").setLevel(logging.INFO)
