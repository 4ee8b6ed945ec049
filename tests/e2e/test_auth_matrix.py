"""Access control: a role x method matrix over every RPC, permission before existence, default
deny, and the policies declared in the contract."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.e2e.auth_helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    bearer,
    code_of,
    create_user,
    failure_of,
    login_pair,
    service_token_for,
    status_of,
    unique_email,
)
from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import ADMIN_PASSWORD, ServerThread, make_settings
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.interceptors.auth import MethodPolicy, policies_from
from usersvc.operator_tasks import create_admin
from usersvc.server import build_server

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT

ACTORS = ("anonymous", "user_self", "user_other", "service", "admin")


def row(*codes: grpc.StatusCode) -> dict[str, grpc.StatusCode]:
    assert len(codes) == len(ACTORS)
    return dict(zip(ACTORS, codes, strict=True))


ALL_OK = row(OK, OK, OK, OK, OK)

# Method (with the UpdateUser mask path after a colon) -> actor -> expected code.
#                         anonymous user_self user_other service admin
MATRIX: dict[str, dict[str, grpc.StatusCode]] = {
    "CreateUser": row(UNAUTH, DENIED, DENIED, OK, OK),
    "BatchCreateUsers": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "GetUser": row(UNAUTH, OK, DENIED, OK, OK),
    "BatchGetUsers": row(UNAUTH, OK, DENIED, OK, OK),
    "ListUsers": row(UNAUTH, DENIED, DENIED, OK, OK),
    "UpdateUser:name": row(UNAUTH, OK, DENIED, DENIED, OK),
    "UpdateUser:email": row(UNAUTH, OK, DENIED, DENIED, OK),
    "UpdateUser:roles": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "UpdateUser:password_change_required": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "DeleteUser": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "UndeleteUser": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "ChangePassword": row(UNAUTH, OK, DENIED, DENIED, OK),
    "DisableUser": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "EnableUser": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "UnlockUser": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "ListAuditEvents": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    # Server streaming: the code of its first message (a checkpoint) or of its refusal.
    "WatchUserEvents": row(UNAUTH, DENIED, DENIED, OK, OK),
    "SendVerificationEmail": row(UNAUTH, OK, DENIED, OK, OK),
    # Public: the code decides, and a made-up one is refused alike for everyone.
    "VerifyEmail": row(INVALID, INVALID, INVALID, INVALID, INVALID),
    "CreateRecoveryCode": row(UNAUTH, DENIED, DENIED, DENIED, OK),
    "RecoverPassword": row(INVALID, INVALID, INVALID, INVALID, INVALID),
    "Login": ALL_OK,
    "RefreshToken": ALL_OK,
    "Logout": ALL_OK,
    "GetJwks": ALL_OK,
}
CELLS = [(method, actor) for method in MATRIX for actor in ACTORS]

USER_SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]
AUTH_SERVICE = auth_pb.DESCRIPTOR.services_by_name["AuthService"]
MUTATING = {
    "UpdateUser",
    "DeleteUser",
    "UndeleteUser",
    "ChangePassword",
    "DisableUser",
    "EnableUser",
    "UnlockUser",
}
RENAMED = "Renamed In Matrix"


@pytest.fixture(scope="module")
def admin_token(channel: grpc.Channel) -> str:
    return login_pair(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token


@pytest.fixture(scope="module")
def service_token(server: ServerThread) -> str:
    """A token as `usersvc issue-service-token` prints it, for a fresh service account."""
    return service_token_for(server.settings, f"matrix-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def bystander_token(users: UserServiceStub, channel: grpc.Channel) -> str:
    """The token of a plain user that acts on users other than itself."""
    user = create_user(users)
    return login_pair(channel, user.email).access_token


def _request(
    rpc: str, variant: str, actor: str, target: user_pb2.User, channel: grpc.Channel
) -> tuple[Any, Any]:
    """(service name, request) of a valid request of `rpc` about `target`."""
    user_requests: dict[str, Callable[[], Any]] = {
        "CreateUser": lambda: pb.CreateUserRequest(
            email=unique_email("matrix-created"), name="Created", password=PASSWORD
        ),
        "BatchCreateUsers": lambda: pb.BatchCreateUsersRequest(
            users=[
                pb.BatchCreateUserEntry(
                    email=unique_email("matrix-batch"), name="Batch", password=PASSWORD
                )
            ]
        ),
        "GetUser": lambda: pb.GetUserRequest(id=target.id),
        "BatchGetUsers": lambda: pb.BatchGetUsersRequest(ids=[target.id, target.id]),
        "ListUsers": lambda: pb.ListUsersRequest(page_size=1),
        "UpdateUser": lambda: pb.UpdateUserRequest(
            user={
                "name": user_pb2.User(id=target.id, name=RENAMED),
                "email": user_pb2.User(id=target.id, email=unique_email("matrix-renamed")),
                "roles": user_pb2.User(id=target.id, roles=["service"]),
                "password_change_required": user_pb2.User(
                    id=target.id, password_change_required=True
                ),
            }[variant],
            update_mask=field_mask_pb2.FieldMask(paths=[variant]),
        ),
        "DeleteUser": lambda: pb.DeleteUserRequest(id=target.id),
        "UndeleteUser": lambda: pb.UndeleteUserRequest(id=target.id),
        # An admin needs no current password; everyone else sends the right one.
        "ChangePassword": lambda: pb.ChangePasswordRequest(
            id=target.id,
            current_password="" if actor == "admin" else PASSWORD,
            new_password=OTHER_PASSWORD,
        ),
        "DisableUser": lambda: pb.DisableUserRequest(id=target.id),
        "EnableUser": lambda: pb.EnableUserRequest(id=target.id),
        "UnlockUser": lambda: pb.UnlockUserRequest(id=target.id),
        "ListAuditEvents": lambda: pb.ListAuditEventsRequest(user_id=target.id, page_size=1),
        "WatchUserEvents": lambda: pb.WatchUserEventsRequest(),
        "SendVerificationEmail": lambda: pb.SendVerificationEmailRequest(user_id=target.id),
        "VerifyEmail": lambda: pb.VerifyEmailRequest(user_id=target.id, code="made-up-code"),
        "CreateRecoveryCode": lambda: pb.CreateRecoveryCodeRequest(user_id=target.id),
        "RecoverPassword": lambda: pb.RecoverPasswordRequest(
            user_id=target.id, code="made-up-code", new_password=OTHER_PASSWORD
        ),
    }
    if rpc in user_requests:
        return "user", user_requests[rpc]()
    auth_requests: dict[str, Callable[[], Any]] = {
        "Login": lambda: auth_pb.LoginRequest(email=target.email, password=PASSWORD),
        "RefreshToken": lambda: auth_pb.RefreshTokenRequest(
            refresh_token=login_pair(channel, target.email).refresh_token
        ),
        "Logout": lambda: auth_pb.LogoutRequest(
            refresh_token=login_pair(channel, target.email).refresh_token
        ),
        "GetJwks": lambda: auth_pb.GetJwksRequest(),
    }
    return "auth", auth_requests[rpc]()


@pytest.mark.one_backend
@pytest.mark.parametrize(("method", "actor"), CELLS, ids=[f"{m}-{a}" for m, a in CELLS])
def test_role_method_matrix(
    method: str,
    actor: str,
    channel: grpc.Channel,
    users: UserServiceStub,
    admin_token: str,
    service_token: str,
    bystander_token: str,
) -> None:
    rpc, _, variant = method.partition(":")
    expected = MATRIX[method][actor]
    target = create_user(users)
    if rpc == "EnableUser" and actor != "user_self":
        users.DisableUser(pb.DisableUserRequest(id=target.id))
    if rpc == "UndeleteUser" and actor != "user_self":  # a deleted user cannot log in
        users.DeleteUser(pb.DeleteUserRequest(id=target.id))
    callers: dict[str, Callable[[], tuple[tuple[str, str], ...]]] = {
        "anonymous": lambda: (),
        "user_self": lambda: bearer(login_pair(channel, target.email).access_token),
        "user_other": lambda: bearer(bystander_token),
        "service": lambda: bearer(service_token),
        "admin": lambda: bearer(admin_token),
    }
    metadata = callers[actor]()
    if rpc == "UnlockUser":
        # Something to unlock: one failure counted (after user_self's login, which resets it).
        assert code_of(lambda: login_pair(channel, target.email, "wrong password!!")) == UNAUTH
    before = users.GetUser(pb.GetUserRequest(id=target.id)).user
    service, request = _request(rpc, variant, actor, target, channel)
    stub: Any = UserServiceStub(channel) if service == "user" else AuthServiceStub(channel)

    response: Any = None
    try:
        if rpc == "WatchUserEvents":
            stream = stub.WatchUserEvents(request, metadata=metadata)
            try:
                response = next(iter(stream))
            finally:
                stream.cancel()
        else:
            response = getattr(stub, rpc)(request, metadata=metadata)
        code = OK
    except grpc.RpcError as err:
        code = status_of(err)
    assert code == expected, f"{method} as {actor}: {code}, expected {expected}"

    # The visible effect matches the code: denied calls change nothing.
    if rpc == "CreateUser":
        found = users.ListUsers(pb.ListUsersRequest(email=request.email)).total_size
        assert found == (1 if code == OK else 0)
    elif rpc == "BatchCreateUsers":
        found = users.ListUsers(pb.ListUsersRequest(email=request.users[0].email)).total_size
        assert found == (1 if code == OK else 0)
        if code == OK:
            assert response.results[0].status.code == 0
    elif rpc == "GetUser" and code == OK:
        assert response.user.id == target.id
    elif rpc == "BatchGetUsers" and code == OK:
        assert [u.id for u in response.users] == [target.id, target.id]
    elif rpc == "ListUsers" and code == OK:
        assert response.total_size >= 1
    elif rpc in ("Login", "RefreshToken"):
        assert response.tokens.access_token
        assert response.tokens.refresh_token
    elif rpc == "GetJwks":
        assert len(response.keys) >= 1
    elif rpc == "WatchUserEvents" and code == OK:
        assert response.resume_token and not response.HasField("event")
    elif rpc in MUTATING:
        _assert_effect(users, channel, rpc, variant, request, before, changed=code == OK)


def _assert_effect(
    users: UserServiceStub,
    channel: grpc.Channel,
    rpc: str,
    variant: str,
    request: Any,
    before: user_pb2.User,
    *,
    changed: bool,
) -> None:
    fetch = pb.GetUserRequest(id=before.id)
    if not changed:
        assert users.GetUser(fetch).user == before
        return
    after = users.GetUser(fetch).user
    assert after.etag != before.etag
    if rpc == "UpdateUser":
        assert getattr(after, variant) == getattr(request.user, variant)
    elif rpc == "ChangePassword":
        assert login_pair(channel, before.email, OTHER_PASSWORD).access_token
    elif rpc == "DisableUser":
        assert after.state == user_pb2.USER_STATE_DISABLED
    elif rpc in ("EnableUser", "UndeleteUser"):
        assert after.state == user_pb2.USER_STATE_ACTIVE
    elif rpc == "UnlockUser":
        assert (before.failed_login_count, after.failed_login_count) == (1, 0)
    elif rpc == "DeleteUser":
        # Soft-deleted: the admin still reads it; GetUser by others is NOT_FOUND.
        assert after.state == user_pb2.USER_STATE_DELETED


def test_matrix_covers_every_rpc() -> None:
    declared = {m.name for m in USER_SERVICE.methods} | {m.name for m in AUTH_SERVICE.methods}
    assert {method.partition(":")[0] for method in MATRIX} == declared


def test_every_rpc_declares_the_policy_of_the_contract() -> None:
    policies = policies_from([pb.DESCRIPTOR, auth_pb.DESCRIPTOR])
    for service in (USER_SERVICE, AUTH_SERVICE):
        for method in service.methods:
            assert f"/{service.full_name}/{method.name}" in policies, method.full_name

    def policy(name: str) -> MethodPolicy:
        return policies[f"/userservice.v1.{name}"]

    admin, admin_service = frozenset({"admin"}), frozenset({"admin", "service"})
    assert policy("UserService/CreateUser") == MethodPolicy(False, admin_service, ())
    assert policy("UserService/BatchCreateUsers") == MethodPolicy(False, admin, ())
    assert policy("UserService/GetUser") == MethodPolicy(False, admin_service, ("id",))
    assert policy("UserService/BatchGetUsers") == MethodPolicy(False, admin_service, ("ids",))
    assert policy("UserService/ListUsers") == MethodPolicy(False, admin_service, ())
    assert policy("UserService/UpdateUser") == MethodPolicy(False, admin, ("user", "id"))
    assert policy("UserService/DeleteUser") == MethodPolicy(False, admin, ())
    assert policy("UserService/ChangePassword") == MethodPolicy(False, admin, ("id",))
    assert policy("UserService/DisableUser") == MethodPolicy(False, admin, ())
    assert policy("UserService/EnableUser") == MethodPolicy(False, admin, ())
    assert policy("UserService/UnlockUser") == MethodPolicy(False, admin, ())
    assert policy("UserService/UndeleteUser") == MethodPolicy(False, admin, ())
    assert policy("UserService/ListAuditEvents") == MethodPolicy(False, admin, ())
    assert policy("UserService/WatchUserEvents") == MethodPolicy(False, admin_service, ())
    assert policy("UserService/SendVerificationEmail") == MethodPolicy(
        False, admin_service, ("user_id",)
    )
    assert policy("UserService/VerifyEmail").public
    assert policy("UserService/CreateRecoveryCode") == MethodPolicy(False, admin, ())
    assert policy("UserService/RecoverPassword").public
    for name in ("Login", "RefreshToken", "Logout", "GetJwks"):
        assert policy(f"AuthService/{name}").public


@pytest.mark.parametrize(
    ("rpc", "request_for"),
    [
        ("GetUser", lambda uid: pb.GetUserRequest(id=uid)),
        ("BatchGetUsers", lambda uid: pb.BatchGetUsersRequest(ids=[uid])),
        ("DeleteUser", lambda uid: pb.DeleteUserRequest(id=uid)),
        ("DisableUser", lambda uid: pb.DisableUserRequest(id=uid)),
        ("EnableUser", lambda uid: pb.EnableUserRequest(id=uid)),
        ("UnlockUser", lambda uid: pb.UnlockUserRequest(id=uid)),
        ("UndeleteUser", lambda uid: pb.UndeleteUserRequest(id=uid)),
        (
            "ChangePassword",
            lambda uid: pb.ChangePasswordRequest(
                id=uid, current_password=PASSWORD, new_password=OTHER_PASSWORD
            ),
        ),
        (
            "UpdateUser",
            lambda uid: pb.UpdateUserRequest(
                user=user_pb2.User(id=uid, name=RENAMED),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
        ),
    ],
)
def test_permission_is_decided_before_existence(
    rpc: str,
    request_for: Callable[[str], Any],
    channel: grpc.Channel,
    users: UserServiceStub,
    bystander_token: str,
    service_token: str,
) -> None:
    stub = UserServiceStub(channel)
    missing = str(uuid.uuid4())
    # Whether or not the id exists (or is even an id), a plain user learns nothing.
    call = getattr(stub, rpc)
    for target in (missing, "not-a-uuid"):
        request = request_for(target)
        details = failure_of(lambda r=request: call(r, metadata=bearer(bystander_token)))  # type: ignore[misc]
        assert details.code == DENIED, f"{rpc}({target!r}) as a plain user"
        assert details.reason == "PERMISSION_DENIED"
    if rpc not in ("GetUser", "BatchGetUsers"):  # the service role may read users: NOT_FOUND
        assert code_of(lambda: call(request_for(missing), metadata=bearer(service_token))) == DENIED
    # The admin may: for the admin the same request is about existence.
    admin_call = getattr(users, rpc)
    assert code_of(lambda: admin_call(request_for(missing))) == grpc.StatusCode.NOT_FOUND


def test_self_cannot_grant_itself_roles(users: UserServiceStub, channel: grpc.Channel) -> None:
    me = create_user(users)
    token = login_pair(channel, me.email).access_token
    stub = UserServiceStub(channel)
    for paths in (["roles"], ["name", "roles"]):
        request = pb.UpdateUserRequest(
            user=user_pb2.User(id=me.id, name=RENAMED, roles=["admin"]),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        details = failure_of(lambda r=request: stub.UpdateUser(r, metadata=bearer(token)))  # type: ignore[misc]
        assert details.code == DENIED
    after = users.GetUser(pb.GetUserRequest(id=me.id)).user
    after.ClearField("last_login_time")  # the login above
    assert after == me


def test_self_change_password_needs_the_current_password(
    users: UserServiceStub, channel: grpc.Channel
) -> None:
    me = create_user(users)
    token = login_pair(channel, me.email).access_token
    stub = UserServiceStub(channel)
    for current in ("", "not my password at all"):
        request = pb.ChangePasswordRequest(
            id=me.id, current_password=current, new_password=OTHER_PASSWORD
        )
        details = failure_of(lambda r=request: stub.ChangePassword(r, metadata=bearer(token)))  # type: ignore[misc]
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(details.violations) == ["current_password"]
    # Nothing changed: the old password still works, the new one does not.
    assert login_pair(channel, me.email, PASSWORD).access_token
    assert code_of(lambda: login_pair(channel, me.email, OTHER_PASSWORD)) == UNAUTH


def test_disable_and_enable_check_the_current_state(users: UserServiceStub) -> None:
    user = create_user(users)
    details = failure_of(lambda: users.EnableUser(pb.EnableUserRequest(id=user.id)))
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    disabled = users.DisableUser(pb.DisableUserRequest(id=user.id)).user
    assert disabled.state == user_pb2.USER_STATE_DISABLED
    details = failure_of(lambda: users.DisableUser(pb.DisableUserRequest(id=user.id)))
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == disabled


@pytest.mark.one_backend
def test_public_methods_ignore_a_bad_token(users: UserServiceStub, channel: grpc.Channel) -> None:
    user = create_user(users)
    garbage = bearer("not.a.token")
    auth = AuthServiceStub(channel)
    assert auth.GetJwks(auth_pb.GetJwksRequest(), metadata=garbage).keys
    pair = auth.Login(auth_pb.LoginRequest(email=user.email, password=PASSWORD), metadata=garbage)
    assert pair.tokens.access_token


@pytest.mark.one_backend
async def test_a_method_without_policy_is_denied_even_to_an_admin(
    database_url: str, tmp_path: Path
) -> None:
    calls: list[bytes] = []

    async def hidden(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        calls.append(request)
        return b"secret"

    running = await build_server(make_settings(database_url, str(tmp_path)))
    running.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "userservice.v1.Hidden", {"Do": grpc.unary_unary_rpc_method_handler(hidden)}
            ),
        )
    )
    await running.start()
    try:
        email = unique_email("deny-admin")
        await create_admin(running.components, email=email, name="Admin", password=PASSWORD)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            login = await AuthServiceStub(ch).Login(
                auth_pb.LoginRequest(email=email, password=PASSWORD)
            )
            admin = bearer(login.tokens.access_token)
            # Control: the token is an admin's on this server.
            listed = await UserServiceStub(ch).ListUsers(
                pb.ListUsersRequest(page_size=1), metadata=admin
            )
            assert listed.total_size >= 1
            do: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/userservice.v1.Hidden/Do"
            )
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await do(b"x", metadata=admin)
            assert exc.value.code() == DENIED
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await do(b"x")
            assert anonymous.value.code() in (DENIED, UNAUTH)
    finally:
        await running.stop(0)
    assert calls == []
