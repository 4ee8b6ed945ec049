"""A caller's deadline bounds the database work done for it, even when the database hangs."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy.engine import make_url

from tests.e2e.auth_helpers import create_user
from tests.support import (
    ServerThread,
    _libpq,
    ensure_admin,
    make_settings,
    mint_token,
    with_bearer,
)
from tests.tcp_proxy import proxied_database
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


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_calls_that_reach_their_deadlines_while_the_database_hangs_leave_no_trace(
    postgres_url: str,
) -> None:
    """Many calls reaching their deadlines at once while the database hangs (connections
    open, nothing answered) end at their deadlines, and once it answers again every read
    path works: none of the cancelled calls keeps a connection, or a place in a pool, that
    the next calls would wait for."""
    with (
        proxied_database(postgres_url) as (proxy, url),
        tempfile.TemporaryDirectory() as data_dir,
    ):
        settings = make_settings(url, data_dir)
        token = mint_token(ensure_admin(make_settings(postgres_url, data_dir)))
        thread = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                stub = UserServiceStub(with_bearer(channel, token))
                user = create_user(stub)

                def get(timeout: float) -> grpc.StatusCode:
                    return _code(
                        lambda: stub.GetUser(pb.GetUserRequest(id=user.id), timeout=timeout)
                    )

                assert get(5) == grpc.StatusCode.OK
                proxy.pause()
                with ThreadPoolExecutor(24) as pool:
                    for _ in range(3):
                        codes = set(pool.map(get, [0.5] * 24))
                        assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
                proxy.resume()
                # The token check and GetUser (point reads), a batch, and a list page.
                assert get(5) == grpc.StatusCode.OK
                batch = stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[user.id]), timeout=5)
                assert [u.id for u in batch.users] == [user.id]
                assert stub.ListUsers(pb.ListUsersRequest(page_size=1), timeout=5).users
        finally:
            thread.stop()


def test_calls_without_a_deadline_end_at_the_servers_own_bound_while_the_database_hangs(
    postgres_url: str,
) -> None:
    """A caller that sets no deadline gets the server's (USERSVC_DEFAULT_CALL_TIMEOUT_SECONDS)
    instead of waiting for as long as the database hangs, on reads and on writes."""
    with (
        proxied_database(postgres_url) as (proxy, url),
        tempfile.TemporaryDirectory() as data_dir,
    ):
        settings = make_settings(url, data_dir, default_call_timeout_seconds=1.0)
        token = mint_token(ensure_admin(make_settings(postgres_url, data_dir)))
        thread = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                stub = UserServiceStub(with_bearer(channel, token))
                user = create_user(stub)
                proxy.pause()
                calls: list[Callable[[], object]] = [
                    lambda: stub.GetUser(pb.GetUserRequest(id=user.id)),
                    lambda: stub.ListUsers(pb.ListUsersRequest(filter='labels.team = "x"')),
                    lambda: create_user(stub),
                ]
                with ThreadPoolExecutor(len(calls)) as pool:
                    started = time.monotonic()
                    futures = [pool.submit(_code, call) for call in calls]
                    # Without the server's bound they would wait until the database
                    # answers again: the test resumes it after 40 s so as not to hang.
                    done, _ = wait(futures, timeout=40)
                    took = time.monotonic() - started
                    proxy.resume()
                assert len(done) == len(calls), f"{len(calls) - len(done)} calls still waiting"
                assert [f.result() for f in futures] == [grpc.StatusCode.DEADLINE_EXCEEDED] * len(
                    calls
                )
                # The bound, plus the driver's cancelling of a statement on a connection
                # that has stopped answering (psycopg: up to 5 s asking, 5 s waiting).
                assert took < 1 + 10 + 5, took
                assert stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5).user.id == user.id
        finally:
            thread.stop()
