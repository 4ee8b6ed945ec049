"""Health tells the truth: liveness stays SERVING, readiness follows the database."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.auth_helpers import create_user
from tests.e2e.conftest import CapturedLogs
from tests.support import (
    ServerThread,
    ensure_admin,
    make_settings,
    mint_token,
    throwaway_database,
    throwaway_sqlite,
    with_bearer,
)
from tests.tcp_proxy import proxied_database
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.migrate import upgrade

USER_SERVICE = "userservice.v1.UserService"
AUTH_SERVICE = "userservice.v1.AuthService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        return status


def _wait_status(address: str, service: str, wanted: int, timeout: float = 10.0) -> float:
    """Seconds until `service` reports `wanted`; fails after `timeout`."""
    started = time.monotonic()
    while True:
        status = _status(address, service)
        if status == wanted:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"{service!r} stayed {status} for {timeout} s, wanted {wanted}")
        time.sleep(0.05)


@pytest.fixture
def unmigrated_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        with throwaway_sqlite(migrated=False) as url:
            yield url
    else:
        admin = request.getfixturevalue("postgres_admin_url")
        with throwaway_database(admin, migrated=False) as url:
            yield url


def test_health_list_answers_every_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.List(health_pb2.HealthListRequest())
    statuses = {name: r.status for name, r in response.statuses.items()}
    assert statuses == {"": SERVING, USER_SERVICE: SERVING, AUTH_SERVICE: SERVING}


@pytest.mark.parametrize("unmigrated_url", ["sqlite", "postgresql"], indirect=True)
def test_unmigrated_database_is_not_ready_until_migrated(
    unmigrated_url: str, logs: CapturedLogs
) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(unmigrated_url, data_dir, readiness_interval_seconds=0.2)
        thread = ServerThread(settings).start()
        try:
            assert _status(thread.address, "") == SERVING
            assert _status(thread.address, USER_SERVICE) == NOT_SERVING
            assert _status(thread.address, AUTH_SERVICE) == NOT_SERVING
            # One line when the state changed, none per check: several checks pass here.
            time.sleep(0.6)
            problems = [x for x in logs.lines() if x["message"].startswith("not ready")]
            assert len(problems) == 1, problems
            assert "run usersvc migrate" in problems[0]["message"]
            assert problems[0]["level"] == "WARNING"

            # A check that lands in the middle of the migration sees a schema on its way (a
            # change of state, so it may say so); once at the head, the replica is ready and
            # stays quiet.
            upgrade(unmigrated_url)
            assert _wait_status(thread.address, USER_SERVICE, SERVING) < 5
            assert _status(thread.address, AUTH_SERVICE) == SERVING
            time.sleep(0.5)
            states = [
                x["message"]
                for x in logs.lines()
                if x["message"].startswith("not ready") or x["message"] == "ready"
            ]
            assert states[-1] == "ready", states
            assert states.count("ready") == 1, states
        finally:
            thread.stop()


def test_readiness_follows_an_unreachable_database_and_recovers(postgres_url: str) -> None:
    with (
        proxied_database(postgres_url) as (proxy, url),
        tempfile.TemporaryDirectory() as data_dir,
    ):
        settings = make_settings(url, data_dir, readiness_interval_seconds=0.2)
        thread = ServerThread(settings).start()
        try:
            assert _status(thread.address, USER_SERVICE) == SERVING
            proxy.down()
            assert _wait_status(thread.address, USER_SERVICE, NOT_SERVING) < 3
            assert _status(thread.address, AUTH_SERVICE) == NOT_SERVING
            # Liveness: the process still answers, so it must not be restarted.
            assert _status(thread.address, "") == SERVING
            proxy.up()
            assert _wait_status(thread.address, USER_SERVICE, SERVING) < 3
            assert _status(thread.address, AUTH_SERVICE) == SERVING
        finally:
            thread.stop()


def test_readiness_follows_a_hung_database_within_the_interval(
    postgres_url: str, logs: CapturedLogs
) -> None:
    """A database that stops answering with its connections open (a hang, a partition) is
    not ready within the interval: cancelling a read on such a connection takes the driver
    seconds (it asks the server to cancel first), which the check must not wait for."""
    with (
        proxied_database(postgres_url) as (proxy, url),
        tempfile.TemporaryDirectory() as data_dir,
    ):
        settings = make_settings(url, data_dir, readiness_interval_seconds=0.2)
        thread = ServerThread(settings).start()
        try:
            assert _status(thread.address, USER_SERVICE) == SERVING
            proxy.pause()
            # The driver's own cancellation takes 5 s and more; the interval is 0.2 s.
            _wait_status(thread.address, USER_SERVICE, NOT_SERVING, timeout=2)
            assert _status(thread.address, AUTH_SERVICE) == NOT_SERVING
            assert _status(thread.address, "") == SERVING
            problems = [x for x in logs.lines() if x["message"].startswith("not ready")]
            assert problems, "no line says why"
            assert "did not answer within 0.2 s" in problems[-1]["message"]
            proxy.resume()
            _wait_status(thread.address, USER_SERVICE, SERVING, timeout=5)
            assert _status(thread.address, AUTH_SERVICE) == SERVING
        finally:
            thread.stop()


def test_start_on_an_unreachable_database_stays_up_and_says_why(logs: CapturedLogs) -> None:
    url = "postgresql+psycopg://postgres:pw@127.0.0.1:1/nothing"
    with tempfile.TemporaryDirectory() as data_dir:
        thread = ServerThread(make_settings(url, data_dir, readiness_interval_seconds=0.2)).start()
        try:
            assert _status(thread.address, "") == SERVING
            assert _status(thread.address, USER_SERVICE) == NOT_SERVING
            time.sleep(0.6)  # a few more checks: still one line
            problems = [x for x in logs.lines() if x["message"].startswith("not ready")]
            assert len(problems) == 1, problems
            message = problems[0]["message"]
            assert "127.0.0.1" in message
            assert "connection refused" in message.lower()
            assert "pw" not in message.replace("postgres", "")  # no password
        finally:
            thread.stop()


def test_the_first_calls_after_a_database_restart_succeed(postgres_url: str) -> None:
    """Every pooled connection dies with a restart (here: the proxy drops them all and takes
    new ones again). The next calls, on every path, get fresh connections rather than
    UNAVAILABLE once per pool: readiness is set to look too rarely to have noticed."""
    with (
        proxied_database(postgres_url) as (proxy, url),
        tempfile.TemporaryDirectory() as data_dir,
    ):
        settings = make_settings(url, data_dir, readiness_interval_seconds=60)
        token = mint_token(ensure_admin(make_settings(postgres_url, data_dir)))
        thread = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                users = UserServiceStub(with_bearer(channel, token))

                def every_path() -> None:
                    user = create_user(users)  # a transaction on the write pool
                    # A filtered page: a read on the read pool; GetUser: a point read.
                    page = users.ListUsers(
                        pb.ListUsersRequest(filter=f'email = "{user.email}"'), timeout=10
                    )
                    assert [u.id for u in page.users] == [user.id]
                    got = users.GetUser(pb.GetUserRequest(id=user.id), timeout=10)
                    assert got.user.email == user.email

                every_path()  # every pool holds a connection now
                proxy.down()
                proxy.up()
                every_path()
        finally:
            thread.stop()
