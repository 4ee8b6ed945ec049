"""Access-log lines: their fields, health probes at DEBUG, streaming calls logged at their end,
and no secret in any line of a session of logins, creations and password changes."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.e2e.auth_helpers import PASSWORD, create_user, login_pair, unique_email
from tests.e2e.conftest import CapturedLogs
from tests.secrets_registry import Detector, remember
from tests.support import ADMIN_PASSWORD, TEST_SECRET, ServerThread, with_bearer
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.logs import cap_library_loggers, configure_logging

WATCH = "/grpc.health.v1.Health/Watch"
CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def debug_logs(logs: CapturedLogs) -> Iterator[CapturedLogs]:
    root = logging.getLogger()
    usersvc = logging.getLogger("usersvc")
    old = root.level, usersvc.level
    root.setLevel(logging.DEBUG)
    usersvc.setLevel(logging.DEBUG)
    cap_library_loggers()  # as configure_logging("DEBUG") does
    try:
        yield logs
    finally:
        root.setLevel(old[0])
        usersvc.setLevel(old[1])


def test_access_line_names_the_caller_the_worker_and_the_call(
    users: UserServiceStub, logs: CapturedLogs
) -> None:
    rid = f"fields-{uuid.uuid4().hex}"
    users.ListUsers(pb.ListUsersRequest(page_size=1), metadata=(("x-request-id", rid),))
    (line,) = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] == "rpc")
    assert line["method"] == "/userservice.v1.UserService/ListUsers"
    assert line["code"] == "OK"
    assert line["level"] == "INFO"
    assert line["pid"] == os.getpid()
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(line["duration_ms"], float)
    assert line["roles"] == ["admin"]
    assert str(uuid.UUID(line["subject"])) == line["subject"]
    # Tracing is off in this server: the fields exist and say so.
    assert line["trace_id"] is None
    assert line["span_id"] is None
    assert "authorization" not in line


def test_anonymous_refusal_is_logged_without_a_caller(
    channel: grpc.Channel, logs: CapturedLogs
) -> None:
    rid = f"anon-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError):
        UserServiceStub(channel).GetUser(
            pb.GetUserRequest(id=str(uuid.uuid4())), metadata=(("x-request-id", rid),)
        )
    (line,) = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] == "rpc")
    assert line["code"] == "UNAUTHENTICATED"
    assert line["subject"] is None
    assert line["roles"] is None


def test_health_checks_log_at_debug_only(channel: grpc.Channel, logs: CapturedLogs) -> None:
    rid = f"probe-{uuid.uuid4().hex}"
    health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), metadata=(("x-request-id", rid),)
    )
    # The call's own marker: a later call that is logged at INFO proves the log is flowing.
    marker = f"marker-{uuid.uuid4().hex}"
    AuthServiceStub(channel).GetJwks(auth_pb.GetJwksRequest(), metadata=(("x-request-id", marker),))
    assert logs.wait_for(lambda x: x.get("request_id") == marker)
    assert not [x for x in logs.lines() if x.get("method") == CHECK]


def test_health_probe_lines_exist_at_debug(channel: grpc.Channel, debug_logs: CapturedLogs) -> None:
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    lines = debug_logs.wait_for(lambda x: x.get("method") == CHECK)
    assert lines
    assert {x["level"] for x in lines} == {"DEBUG"}
    assert lines[0]["code"] == "OK"


def test_streaming_calls_are_logged_and_counted_when_they_end(
    channel: grpc.Channel, server: ServerThread, debug_logs: CapturedLogs
) -> None:
    assert server.running is not None
    registry = server.running.metrics.registry
    watch_labels = {
        "grpc_type": "server_stream",
        "grpc_service": "grpc.health.v1.Health",
        "grpc_method": "Watch",
    }
    reflection_labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
        "grpc_method": "ServerReflectionInfo",
    }

    def handled(labels: dict[str, str], code: str) -> float:
        found = registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": code}
        )
        return found or 0.0

    before = handled(watch_labels, "CANCELLED"), handled(reflection_labels, "OK")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    first = next(watch)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    # Open: not logged yet.
    assert not [x for x in debug_logs.lines() if x.get("method") == WATCH]
    watch.cancel()
    (line,) = debug_logs.wait_for(lambda x: x.get("method") == WATCH)
    assert line["code"] == "CANCELLED"
    assert line["level"] == "DEBUG"

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = list(stub.ServerReflectionInfo(requests()))
    assert responses
    (line,) = debug_logs.wait_for(lambda x: x.get("method") == REFLECTION)
    assert line["code"] == "OK"
    assert line["level"] == "INFO"
    assert handled(watch_labels, "CANCELLED") == before[0] + 1
    assert handled(reflection_labels, "OK") == before[1] + 1


def test_no_secret_reaches_any_log_line(
    channel: grpc.Channel, users: UserServiceStub, debug_logs: CapturedLogs
) -> None:
    email = unique_email("logscan")
    user = create_user(users, email=email)
    pair = login_pair(channel, email)
    refreshed = AuthServiceStub(channel).RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=pair.refresh_token)
    )
    remember(pair.access_token, pair.refresh_token)
    remember(refreshed.tokens.access_token, refreshed.tokens.refresh_token)
    own = UserServiceStub(with_bearer(channel, refreshed.tokens.access_token))
    new_password = f"fresh pass {uuid.uuid4().hex[:6]}"
    remember(new_password)
    own.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, current_password=PASSWORD, new_password=new_password)
    )
    marker = f"scan-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError):
        AuthServiceStub(channel).Login(
            auth_pb.LoginRequest(email=email, password=PASSWORD),
            metadata=(("x-request-id", marker),),
        )
    assert debug_logs.wait_for(lambda x: x.get("request_id") == marker and x["message"] == "rpc")
    text = debug_logs.text
    assert text.count('"message": "rpc"') >= 5
    detector = Detector.for_suite(also=[ADMIN_PASSWORD, TEST_SECRET, PASSWORD, new_password])
    assert detector.findings(text) == []
    # The scan can fail: a token in a line is found.
    assert detector.findings(text + pair.access_token)


def test_debug_logging_keeps_parameter_logging_libraries_at_info() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    aiosqlite = logging.getLogger("aiosqlite")
    aiosqlite.setLevel(logging.NOTSET)
    try:
        configure_logging("DEBUG")
        assert root.level == logging.DEBUG
        assert not aiosqlite.isEnabledFor(logging.DEBUG)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
