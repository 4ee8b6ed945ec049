"""Three separate server processes on one PostgreSQL database behave as one service."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import text

from tests.e2e.auth_helpers import PASSWORD, unique_email
from tests.processes import ServerProcess, server_env
from tests.smtp_server import SmtpServer, free_port
from tests.support import (
    ADMIN_PASSWORD,
    ensure_admin,
    login,
    make_settings,
    sync_engine,
    throwaway_database,
)
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub

TOKEN_CACHE_SECONDS = 1.0
# Round robin over the replicas, skipping those whose health is not SERVING, and retrying
# UNAVAILABLE (a replica that is stopping refuses new calls with it), as a careful client does.
ROUND_ROBIN_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "userservice.v1.UserService"},
        "methodConfig": [
            {
                "name": [{"service": "userservice.v1.UserService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


@dataclass
class Replicas:
    database_url: str
    data_dir: str
    ports: list[int]
    servers: list[ServerProcess]
    admin_token: str
    smtp: SmtpServer

    def env(self, port: int) -> dict[str, str]:
        return server_env(
            self.database_url,
            self.data_dir,
            USERSVC_LISTEN_ADDRESS=f"127.0.0.1:{port}",
            USERSVC_TOKEN_CACHE_SECONDS=str(TOKEN_CACHE_SECONDS),
            USERSVC_SMTP_HOST="127.0.0.1",
            USERSVC_SMTP_PORT=str(self.smtp.port),
            USERSVC_OUTBOX_POLL_SECONDS="0.1",
            USERSVC_SHUTDOWN_DRAIN_SECONDS="1",
            USERSVC_SHUTDOWN_GRACE_SECONDS="5",
            USERSVC_READINESS_INTERVAL_SECONDS="0.5",
        )

    def stub(self, i: int, token: str | None = None) -> tuple[grpc.Channel, UserServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.ports[i]}")
        return channel, UserServiceStub(channel)


@pytest.fixture(scope="module")
def replicas(postgres_admin_url: str) -> Iterator[Replicas]:
    with (
        throwaway_database(postgres_admin_url) as url,
        tempfile.TemporaryDirectory() as data_dir,
        SmtpServer() as smtp,
    ):
        settings = make_settings(url, data_dir)
        admin_id = ensure_admin(settings)
        ports = [free_port() for _ in range(3)]
        group = Replicas(url, data_dir, ports, [], "", smtp)
        try:
            group.servers = [ServerProcess(group.env(port)) for port in ports]
            with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                group.admin_token = login(channel, "admin@example.com", ADMIN_PASSWORD).access_token
            assert admin_id
            yield group
        finally:
            for server in group.servers:
                server.kill()


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_revocation_through_one_replica_reaches_the_others(replicas: Replicas) -> None:
    admin = _auth(replicas.admin_token)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in replicas.ports]
    try:
        stubs = [UserServiceStub(c) for c in channels]
        for change in ("password", "disable"):
            email = unique_email("replica")
            user = (
                stubs[0]
                .CreateUser(
                    pb.CreateUserRequest(email=email, name="Replica User", password=PASSWORD),
                    metadata=admin,
                )
                .user
            )
            token = login(channels[0], email, PASSWORD).access_token
            own = _auth(token)
            for stub in stubs[1:]:  # the token works everywhere, and B and C have cached it
                assert stub.GetUser(pb.GetUserRequest(id=user.id), metadata=own).user.id == user.id
            if change == "password":
                stubs[0].ChangePassword(
                    pb.ChangePasswordRequest(
                        id=user.id, current_password=PASSWORD, new_password="another secret 42"
                    ),
                    metadata=own,
                )
            else:
                stubs[0].DisableUser(pb.DisableUserRequest(id=user.id), metadata=admin)
            changed = time.monotonic()
            request = pb.GetUserRequest(id=user.id)
            for stub in stubs[1:]:
                while True:
                    code = _code(lambda s=stub, r=request, m=own: s.GetUser(r, metadata=m))
                    if code == grpc.StatusCode.UNAUTHENTICATED:
                        break
                    assert code == grpc.StatusCode.OK
                    assert time.monotonic() - changed < TOKEN_CACHE_SECONDS + 1.0, change
                    time.sleep(0.05)
    finally:
        for c in channels:
            c.close()


def test_concurrent_creates_with_one_request_id_over_three_replicas_make_one_user(
    replicas: Replicas,
) -> None:
    admin = _auth(replicas.admin_token)
    request = pb.CreateUserRequest(
        email=unique_email("idem"),
        name="Once Only",
        password=PASSWORD,
        request_id=str(uuid.uuid4()),
    )
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in replicas.ports]
    try:
        stubs = [UserServiceStub(c) for c in channels]
        with ThreadPoolExecutor(20) as pool:
            results = list(
                pool.map(lambda i: stubs[i % 3].CreateUser(request, metadata=admin).user, range(20))
            )
    finally:
        for c in channels:
            c.close()
    assert len({u.id for u in results}) == 1
    with sync_engine(replicas.database_url).connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM users WHERE email = :e"), {"e": request.email}
        ).scalar()
    assert count == 1


def test_three_dispatchers_deliver_each_welcome_email_once(replicas: Replicas) -> None:
    admin = _auth(replicas.admin_token)
    emails = [unique_email("welcome") for _ in range(12)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in replicas.ports]
    try:
        for i, email in enumerate(emails):
            UserServiceStub(channels[i % 3]).CreateUser(
                pb.CreateUserRequest(email=email, name="Welcome Me", password=PASSWORD),
                metadata=admin,
            )
    finally:
        for c in channels:
            c.close()

    def delivered() -> Counter[str]:
        return Counter(r for m in replicas.smtp.handler.received for r in m.rcpt_tos if r in emails)

    deadline = time.monotonic() + 15
    while len(delivered()) < len(emails) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # several more polls of every dispatcher: no second delivery
    assert delivered() == Counter(dict.fromkeys(emails, 1))


def test_a_rolling_restart_under_round_robin_load_fails_no_call(replicas: Replicas) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in replicas.ports)
    options = [("grpc.service_config", ROUND_ROBIN_CONFIG), ("grpc.enable_retries", 1)]
    stop = threading.Event()
    outcomes: Counter[grpc.StatusCode] = Counter()
    failures: list[str] = []
    admin = _auth(replicas.admin_token)

    with grpc.insecure_channel(target, options=options) as channel:
        stub = UserServiceStub(channel)
        me = stub.ListUsers(pb.ListUsersRequest(page_size=1), metadata=admin, timeout=10)
        some_id = me.users[0].id

        def load() -> None:
            while not stop.is_set():
                try:
                    stub.GetUser(pb.GetUserRequest(id=some_id), metadata=admin, timeout=10)
                    outcomes[grpc.StatusCode.OK] += 1
                except grpc.RpcError as err:
                    outcomes[err.code()] += 1
                    failures.append(f"{err.code()}: {err.details()}")

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i, port in enumerate(replicas.ports):
                time.sleep(0.5)
                assert replicas.servers[i].terminate() == 0
                replicas.servers[i] = ServerProcess(replicas.env(port))
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, (outcomes, failures[:5])
    assert outcomes[grpc.StatusCode.OK] > 100
