"""Cross-cutting behaviour: request ids, access log, error mapping, health, reflection, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.conftest import CapturedLogs
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    details_of,
    ensure_admin,
    login,
    make_settings,
    mint_token,
    with_bearer,
)
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.domain.auth import RequestContext
from usersvc.domain.models import UserView
from usersvc.services.users import UserService

ROOT = Path(__file__).resolve().parents[2]


def test_request_id_is_taken_from_metadata_and_echoed(users: UserServiceStub) -> None:
    rid = f"req-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as exc:
        users.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), metadata=(("x-request-id", rid),))
    err = exc.value
    assert isinstance(err, grpc.Call)
    details = details_of(err)
    assert details.request_id == rid
    assert details.trailers["x-request-id"] == rid


def test_request_id_is_generated_when_missing_or_insane(users: UserServiceStub) -> None:
    for metadata in (
        (),
        (("x-request-id", "bad id; with <spaces>"),),
        (("x-request-id", "y" * 300),),
    ):
        _, call = users.ListUsers.with_call(pb.ListUsersRequest(page_size=1), metadata=metadata)
        trailers = dict(call.trailing_metadata() or ())
        rid = str(trailers["x-request-id"])
        assert str(uuid.UUID(rid)) == rid


def test_one_access_log_line_per_rpc(users: UserServiceStub, logs: CapturedLogs) -> None:
    rid = f"log-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError):
        users.GetUser(pb.GetUserRequest(id="nope"), metadata=(("x-request-id", rid),))
    # An aborted call's status reaches the client before the server's finally-block logs.
    lines = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] == "rpc")
    assert len(lines) == 1
    line = lines[0]
    assert line["method"] == "/userservice.v1.UserService/GetUser"
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["level"] == "INFO"
    assert line["time"].endswith("Z")
    assert isinstance(line["duration_ms"], float)
    assert line["peer"].startswith("ipv4:127.0.0.1:")


def test_unexpected_error_is_internal_with_a_generic_message(
    users: UserServiceStub, logs: CapturedLogs, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(self: UserService, user_id: str, **_: object) -> None:
        raise RuntimeError("connection string postgresql://admin:hunter2@db")

    monkeypatch.setattr(UserService, "get_user", explode)
    with pytest.raises(grpc.RpcError) as exc:
        users.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
    details = details_of(exc.value)
    assert details.code == grpc.StatusCode.INTERNAL
    assert details.message == "internal error"
    assert "hunter2" not in repr(exc.value)
    errors = logs.wait_for(lambda x: x["level"] == "ERROR")
    assert errors
    assert any("RuntimeError" in x.get("exception", "") for x in errors)
    assert all(x["request_id"] == details.request_id for x in errors)


def test_deadline_running_out_is_deadline_exceeded(
    users: UserServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    async def slow(self: UserService, user_id: str, **_: object) -> None:
        await asyncio.sleep(5)

    monkeypatch.setattr(UserService, "get_user", slow)
    with pytest.raises(grpc.RpcError) as exc:
        users.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), timeout=0.3)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unreachable_database_is_unavailable_with_retry_info() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2"
    with tempfile.TemporaryDirectory() as data_dir:
        thread = ServerThread(make_settings(url, data_dir)).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                # Checking the token's version needs the database too: UNAVAILABLE, not a 401.
                stub = UserServiceStub(with_bearer(channel, mint_token(uuid.uuid4())))
                with pytest.raises(grpc.RpcError) as exc:
                    stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
        finally:
            thread.stop()
    details = details_of(exc.value)
    assert details.code == grpc.StatusCode.UNAVAILABLE
    assert details.retry_delay_seconds is not None
    assert details.retry_delay_seconds > 0


def test_health_overall_and_per_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "userservice.v1.UserService"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as exc:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"userservice.v1.UserService", "grpc.health.v1.Health"} <= names


def _reflect_v1(
    channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    """One request over reflection v1 (the same messages as v1alpha, under the v1 name)."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request])))
    return response


def test_reflection_v1_lists_every_service(channel: grpc.Channel) -> None:
    response = _reflect_v1(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert {s.name for s in response.list_services_response.service} == {
        "userservice.v1.UserService",
        "userservice.v1.AuthService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"),
        ("google.rpc.BadRequest", "google/rpc/error_details.proto"),
        ("google.rpc.Status", "google/rpc/status.proto"),
    ],
)
def test_reflection_v1_describes_itself_and_the_error_details(
    channel: grpc.Channel, symbol: str, file: str
) -> None:
    response = _reflect_v1(
        channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    assert not response.HasField("error_response"), response.error_response.error_message
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    assert names[0] == file


def test_parallel_writes_on_sqlite_never_see_a_locked_database(sqlite_url: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir)
        ensure_admin(settings)
        thread = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(thread.address) as raw:
                channel = with_bearer(
                    raw, login(raw, "admin@example.com", ADMIN_PASSWORD).access_token
                )
                stub = UserServiceStub(channel)
                tag = uuid.uuid4().hex[:8]

                def make(i: int) -> grpc.StatusCode:
                    try:
                        stub.CreateUser(
                            pb.CreateUserRequest(
                                email=f"par-{tag}-{i}@example.com",
                                name="Par",
                                password="unusual-pass-4217",
                            )
                        )
                        return grpc.StatusCode.OK
                    except grpc.RpcError as err:
                        return err.code()

                with ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(make, range(40)))
                found = [
                    stub.ListUsers(
                        pb.ListUsersRequest(email=f"par-{tag}-{i}@example.com")
                    ).total_size
                    for i in range(40)
                ]
        finally:
            thread.stop()
    assert codes == [grpc.StatusCode.OK] * 40
    assert found == [1] * 40


def test_graceful_shutdown_finishes_in_flight_calls(sqlite_url: str) -> None:
    import asyncio

    started = threading.Event()
    original = UserService.get_user

    async def slow_get(
        self: UserService, user_id: str, *, ctx: RequestContext | None = None
    ) -> UserView:
        started.set()
        await asyncio.sleep(0.5)
        return await original(self, user_id, ctx=ctx)

    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir, shutdown_drain_seconds=1.0)
        ensure_admin(settings)
        thread = ServerThread(settings).start()
        with grpc.insecure_channel(thread.address) as raw:
            channel = with_bearer(raw, login(raw, "admin@example.com", ADMIN_PASSWORD).access_token)
            stub = UserServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            user = stub.CreateUser(
                pb.CreateUserRequest(
                    email=f"gs-{uuid.uuid4().hex[:8]}@example.com",
                    name="Grace",
                    password="unusual-pass-4217",
                )
            ).user
            UserService.get_user = slow_get  # type: ignore[method-assign]
            try:
                future = stub.GetUser.future(pb.GetUserRequest(id=user.id))
                assert started.wait(5)
                stopper = threading.Thread(target=thread.stop, kwargs={"grace": 5})
                stopper.start()
                time.sleep(0.2)
                # Health says NOT_SERVING before the listener closes.
                status = health.Check(health_pb2.HealthCheckRequest(service="")).status
                assert future.result(timeout=5).user.id == user.id
                stopper.join(10)
            finally:
                UserService.get_user = original  # type: ignore[method-assign]
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def serve_process() -> Iterator[tuple[subprocess.Popen[str], str, dict[str, str]]]:
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0", "USERSVC_DATA_DIR": data_dir}
        env.pop("USERSVC_DATABASE_URL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "usersvc", "serve", "--migrate"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        address = ""
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            entry = json.loads(line)
            if entry["message"] == "serving":
                address = entry["address"]
                break
        try:
            yield proc, address, env
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_serve_migrates_sqlite_and_exits_zero_on_sigterm(
    serve_process: tuple[subprocess.Popen[str], str, dict[str, str]],
) -> None:
    proc, address, env = serve_process
    assert address, "server did not report its address"
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "usersvc",
            "create-admin",
            "--email",
            "root@example.com",
            "--name",
            "Root",
        ],
        input="a long admin password\n",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    assert "created admin root@example.com" in created.stdout
    with grpc.insecure_channel(address) as raw:
        token = login(raw, "root@example.com", "a long admin password").access_token
        request = pb.CreateUserRequest(
            email="first@example.com", name="First", password="unusual-pass-4217"
        )
        user = UserServiceStub(with_bearer(raw, token)).CreateUser(request).user
        assert user.email == "first@example.com"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_workers_share_one_address_and_stop_cleanly_on_sigterm() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0",
            "USERSVC_DATA_DIR": data_dir,
            "USERSVC_WORKERS": "2",
        }
        env.pop("USERSVC_DATABASE_URL", None)
        log_path = Path(data_dir) / "serve.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "usersvc", "serve", "--migrate"],
                env=env,
                stderr=log_file,
                text=True,
                cwd=ROOT,
            )
        try:
            serving: list[dict[str, object]] = []
            deadline = time.monotonic() + 30
            while len(serving) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
                serving = [
                    json.loads(line)
                    for line in log_path.read_text().splitlines()
                    if '"message": "serving"' in line
                ]
            assert len(serving) == 2, log_path.read_text()
            assert serving[0]["address"] == serving[1]["address"]
            assert serving[0]["pid"] != serving[1]["pid"]
            address = str(serving[0]["address"])
            for _ in range(8):  # new connections, spread over the workers by the kernel
                with grpc.insecure_channel(address) as channel:
                    status = (
                        health_pb2_grpc.HealthStub(channel)
                        .Check(health_pb2.HealthCheckRequest(service="userservice.v1.UserService"))
                        .status
                    )
                    assert status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            stopped = [line for line in log_path.read_text().splitlines() if '"stopped"' in line]
            assert len(stopped) == 2
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_second_server_on_a_taken_address_fails_to_start(sqlite_url: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        first = ServerThread(make_settings(sqlite_url, data_dir)).start()
        try:
            second = ServerThread(make_settings(sqlite_url, data_dir, listen_address=first.address))
            with pytest.raises(OSError, match="could not bind"):
                second.start()
        finally:
            first.stop()
