"""A caller's deadline bounds the database work done for it, even when the database hangs."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2

from tests.e2e.auth_helpers import create_user
from tests.support import (
    ServerThread,
    _libpq,
    ensure_admin,
    make_settings,
    mint_token,
    with_bearer,
)
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub


@pytest.fixture(scope="module")
def small_pool_server(postgres_url: str) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        # Two connections: a call that leaked its connection would starve the next ones.
        settings = make_settings(postgres_url, data_dir, db_pool_size=2)
        thread = ServerThread(settings).start()
        thread.admin_token = mint_token(ensure_admin(settings))  # type: ignore[attr-defined]
        yield thread
        thread.stop()


def _backends_of(conn: psycopg.Connection, database: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT state, coalesce(wait_event_type, '') FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
        (database,),
    ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


def test_a_call_blocked_on_a_lock_ends_at_its_deadline_and_is_rolled_back(
    small_pool_server: ServerThread, postgres_url: str
) -> None:
    from sqlalchemy.engine import make_url

    database = str(make_url(postgres_url).database)
    with grpc.insecure_channel(small_pool_server.address) as channel:
        stub = UserServiceStub(with_bearer(channel, small_pool_server.admin_token))  # type: ignore[attr-defined]
        user = create_user(stub)
        with psycopg.connect(_libpq(postgres_url)) as locker:
            # Another transaction holds the user's row: the update waits on the lock.
            locker.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (user.id,))
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as exc:
                stub.UpdateUser(
                    pb.UpdateUserRequest(
                        user=user_pb2.User(id=user.id, name="Too Late"),
                        update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                    ),
                    timeout=1.0,
                )
            elapsed = time.monotonic() - started
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert elapsed < 3
            # The server gave up its statement too: nothing of ours waits on the lock.
            deadline = time.monotonic() + 3
            with psycopg.connect(_libpq(postgres_url), autocommit=True) as observer:
                while time.monotonic() < deadline:
                    waiting = [b for b in _backends_of(observer, database) if b[1] == "Lock"]
                    if not waiting:
                        break
                    time.sleep(0.05)
                assert not waiting
            locker.rollback()
        # Rolled back: the name is unchanged, and the server goes on serving with its pool.
        for _ in range(5):
            got = stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5).user
            assert got.name == user.name
        renamed = stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=user.id, name="In Time"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            timeout=5,
        ).user
        assert renamed.name == "In Time"
