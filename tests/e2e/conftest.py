"""A real server per backend, real stubs over a real port."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.secrets_registry import record_secrets
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    ensure_admin,
    login,
    make_settings,
    sync_engine,
    with_bearer,
)
from userservice.v1 import auth_service_pb2_grpc, user_service_pb2_grpc
from usersvc.logs import JsonFormatter

ADMIN_EMAIL = "admin@example.com"
ONE_BACKEND = "sqlite"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked one_backend run on one database: what they check (the role x method
    matrix, token verification) is decided before storage is touched."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec is not None else None
        if item.get_closest_marker("one_backend") and backend not in (None, ONE_BACKEND):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir)
        ensure_admin(settings, ADMIN_EMAIL)
        thread = ServerThread(settings).start()
        yield thread
        thread.stop()


@pytest.fixture(scope="session")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    """A channel without credentials."""
    with grpc.insecure_channel(server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        # Records every password and token that crosses it, for the end-of-suite audit scan.
        yield record_secrets(ch)


@pytest.fixture(scope="session")
def admin_channel(channel: grpc.Channel) -> grpc.Channel:
    """A channel that calls as the admin (re-logs in if an earlier test revoked its token)."""
    return with_bearer(channel, login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token)


@pytest.fixture(scope="session")
def users(admin_channel: grpc.Channel) -> user_service_pb2_grpc.UserServiceStub:
    """UserService as the admin."""
    return user_service_pb2_grpc.UserServiceStub(admin_channel)


@pytest.fixture(scope="session")
def auth(channel: grpc.Channel) -> auth_service_pb2_grpc.AuthServiceStub:
    return auth_service_pb2_grpc.AuthServiceStub(channel)


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Engine]:
    engine = sync_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def empty_users(db: Engine) -> None:
    """Start the test with no users (the database is shared by the session)."""
    with db.begin() as conn:
        conn.execute(text("DELETE FROM users WHERE email <> :admin"), {"admin": ADMIN_EMAIL})


class CapturedLogs:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Lines matching `match`, waiting up to `timeout` for the first to appear."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines() if match(line)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture
def logs() -> Iterator[CapturedLogs]:
    """Every log line the process writes during the test, formatted as in production."""
    captured = CapturedLogs()
    handler = logging.StreamHandler(captured.stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
