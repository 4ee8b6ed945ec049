"""The client's channel policy against a server that fails on purpose: what is retried, how
often, and that a retried CreateUser or BatchCreateUsers keeps its request_id."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from userservice.client import MAX_ATTEMPTS, AsyncClient, Client, Unavailable
from userservice.v1 import auth_service_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc
from userservice.v1 import user_service_pb2 as pb


class FlakyUsers:
    """Answers UNAVAILABLE to the first `failures` calls of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, list[Message | str]] = {}
        self.lock = threading.Lock()

    def _attempt(self, method: str, record: object, context: grpc.ServicerContext) -> None:
        with self.lock:
            seen = self.calls.setdefault(method, [])
            seen.append(record)  # type: ignore[arg-type]
            failing = len(seen) <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        self._attempt("GetUser", request.id, context)
        return user_service_pb2.GetUserResponse(user=user_pb2.User(id=request.id))

    def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.CreateUserResponse:
        self._attempt("CreateUser", request, context)
        return user_service_pb2.CreateUserResponse(user=user_pb2.User(email=request.email))

    def BatchGetUsers(
        self, request: user_service_pb2.BatchGetUsersRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.BatchGetUsersResponse:
        self._attempt("BatchGetUsers", request, context)
        return pb.BatchGetUsersResponse(users=[user_pb2.User(id=i) for i in request.ids])

    def BatchCreateUsers(
        self, request: user_service_pb2.BatchCreateUsersRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.BatchCreateUsersResponse:
        self._attempt("BatchCreateUsers", request, context)
        return pb.BatchCreateUsersResponse(
            results=[
                pb.BatchCreateUserResult(user=user_pb2.User(email=u.email)) for u in request.users
            ]
        )

    def SendVerificationEmail(
        self, request: user_service_pb2.SendVerificationEmailRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.SendVerificationEmailResponse:
        self._attempt("SendVerificationEmail", request.user_id, context)
        return pb.SendVerificationEmailResponse()

    def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: grpc.ServicerContext
    ) -> user_service_pb2.DeleteUserResponse:
        self._attempt("DeleteUser", request.id, context)
        return user_service_pb2.DeleteUserResponse()

    def RefreshToken(
        self, request: auth_service_pb2.RefreshTokenRequest, context: grpc.ServicerContext
    ) -> auth_service_pb2.RefreshTokenResponse:
        self._attempt("RefreshToken", request.refresh_token, context)
        return auth_service_pb2.RefreshTokenResponse()

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        def unary(behaviour: Any, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        users = {
            "GetUser": unary(self.GetUser, pb.GetUserRequest, pb.GetUserResponse),
            "CreateUser": unary(self.CreateUser, pb.CreateUserRequest, pb.CreateUserResponse),
            "DeleteUser": unary(self.DeleteUser, pb.DeleteUserRequest, pb.DeleteUserResponse),
            "BatchGetUsers": unary(
                self.BatchGetUsers, pb.BatchGetUsersRequest, pb.BatchGetUsersResponse
            ),
            "BatchCreateUsers": unary(
                self.BatchCreateUsers, pb.BatchCreateUsersRequest, pb.BatchCreateUsersResponse
            ),
            "SendVerificationEmail": unary(
                self.SendVerificationEmail,
                pb.SendVerificationEmailRequest,
                pb.SendVerificationEmailResponse,
            ),
        }
        refresh = unary(
            self.RefreshToken,
            auth_service_pb2.RefreshTokenRequest,
            auth_service_pb2.RefreshTokenResponse,
        )
        return (
            grpc.method_handlers_generic_handler("userservice.v1.UserService", users),
            grpc.method_handlers_generic_handler(
                "userservice.v1.AuthService", {"RefreshToken": refresh}
            ),
        )


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyUsers, str]]:
    users = FlakyUsers(failures=MAX_ATTEMPTS - 1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(users.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield users, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_reads_are_retried_on_unavailable_up_to_four_attempts(
    flaky: tuple[FlakyUsers, str],
) -> None:
    users, address = flaky
    with Client(address) as client:
        assert client.get_user("u1").id == "u1"
    assert len(users.calls["GetUser"]) == MAX_ATTEMPTS


def test_a_fifth_attempt_is_never_made(flaky: tuple[FlakyUsers, str]) -> None:
    users, address = flaky
    users.failures = MAX_ATTEMPTS
    with Client(address) as client, pytest.raises(Unavailable):
        client.get_user("u1")
    assert len(users.calls["GetUser"]) == MAX_ATTEMPTS


def test_create_is_retried_with_one_request_id(flaky: tuple[FlakyUsers, str]) -> None:
    users, address = flaky
    with Client(address) as client:
        assert client.create_user(email="a@example.com", name="Ab", password="x" * 10).email
    attempts = users.calls["CreateUser"]
    assert len(attempts) == MAX_ATTEMPTS
    keys = {a.request_id for a in attempts if isinstance(a, user_service_pb2.CreateUserRequest)}
    assert len(keys) == 1 and next(iter(keys))


def test_batches_are_retried_and_a_batch_create_keeps_one_request_id(
    flaky: tuple[FlakyUsers, str],
) -> None:
    users, address = flaky
    with Client(address) as client:
        assert [u.id for u in client.batch_get_users(["u1", "u2"]).users] == ["u1", "u2"]
        entry = pb.BatchCreateUserEntry(email="a@example.com", name="Ab", password="x" * 10)
        (result,) = client.batch_create_users([entry])
        assert result.ok and result.user is not None and result.user.email == "a@example.com"
    assert len(users.calls["BatchGetUsers"]) == MAX_ATTEMPTS
    attempts = users.calls["BatchCreateUsers"]
    assert len(attempts) == MAX_ATTEMPTS
    keys = {a.request_id for a in attempts if isinstance(a, pb.BatchCreateUsersRequest)}
    assert len(keys) == 1 and next(iter(keys))


def test_non_idempotent_calls_are_not_retried(flaky: tuple[FlakyUsers, str]) -> None:
    users, address = flaky
    with Client(address) as client:
        with pytest.raises(Unavailable):
            client.delete_user("u1")
        with pytest.raises(Unavailable):
            client.refresh_token("r1")
        with pytest.raises(Unavailable):
            client.send_verification_email("u1")
        # Through the client's channel, a CreateUser without request_id is not retried either.
        stub = user_service_pb2_grpc.UserServiceStub(client.channel)
        with pytest.raises(grpc.RpcError):
            stub.CreateUser(user_service_pb2.CreateUserRequest(email="b@example.com"))
    once = ("DeleteUser", "RefreshToken", "SendVerificationEmail", "CreateUser")
    assert {m: len(users.calls[m]) for m in once} == dict.fromkeys(once, 1)


async def test_the_async_client_retries_the_same_way(flaky: tuple[FlakyUsers, str]) -> None:
    users, address = flaky
    async with AsyncClient(address) as client:
        assert (await client.get_user("u2")).id == "u2"
        assert (await client.create_user(email="c@example.com", name="Cc", password="x" * 10)).email
        entry = pb.BatchCreateUserEntry(email="d@example.com", name="Dd", password="x" * 10)
        assert (await client.batch_create_users([entry]))[0].ok
        with pytest.raises(Unavailable):
            await client.delete_user("u2")
    assert len(users.calls["GetUser"]) == MAX_ATTEMPTS
    assert len(users.calls["CreateUser"]) == MAX_ATTEMPTS
    assert len(users.calls["BatchCreateUsers"]) == MAX_ATTEMPTS
    assert len(users.calls["DeleteUser"]) == 1
