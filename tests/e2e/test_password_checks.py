"""ChangePassword's current_password is checked like a login: wrong guesses count toward the
same per-account lock, so one stolen access token is not an unlimited password oracle."""

from __future__ import annotations

import grpc
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import PASSWORD, bearer, code_of, create_user, login_pair
from tests.e2e.integrity_helpers import stored_user
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub

MAX_FAILURES = 10  # login_max_failures of the session server (the default)
NEW_PASSWORD = "a brand new passphrase 31"


def _change(stub: UserServiceStub, user_id: str, token: str, current: str) -> grpc.StatusCode:
    request = pb.ChangePasswordRequest(
        id=user_id, current_password=current, new_password=NEW_PASSWORD
    )
    return code_of(lambda: stub.ChangePassword(request, metadata=bearer(token)))


def test_wrong_current_passwords_lock_the_account_for_change_password_and_login(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    user = create_user(users)
    token = login_pair(channel, user.email).access_token
    stub = UserServiceStub(channel)
    guesses = [_change(stub, user.id, token, f"guess number {n:02d}") for n in range(MAX_FAILURES)]
    assert guesses == [grpc.StatusCode.INVALID_ARGUMENT] * MAX_FAILURES
    row = stored_user(db, user.id)
    assert row is not None
    assert row["locked_until"] is not None
    # Locked: the right password works neither here nor in Login, and nothing changed.
    assert _change(stub, user.id, token, PASSWORD) == grpc.StatusCode.INVALID_ARGUMENT
    auth = AuthServiceStub(channel)
    login = auth_pb.LoginRequest(email=user.email, password=PASSWORD)
    assert code_of(lambda: auth.Login(login)) == grpc.StatusCode.UNAUTHENTICATED
    assert stored_user(db, user.id)["password_hash"] == row["password_hash"]  # type: ignore[index]


def test_change_password_and_login_failures_add_up(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    user = create_user(users)
    token = login_pair(channel, user.email).access_token
    stub = UserServiceStub(channel)
    auth = AuthServiceStub(channel)
    half = MAX_FAILURES // 2
    for n in range(half):
        assert _change(stub, user.id, token, f"wrong {n}") == grpc.StatusCode.INVALID_ARGUMENT
    wrong_login = auth_pb.LoginRequest(email=user.email, password="not it at all 1")
    for _ in range(MAX_FAILURES - half):
        assert code_of(lambda: auth.Login(wrong_login)) == grpc.StatusCode.UNAUTHENTICATED
    assert stored_user(db, user.id)["locked_until"] is not None  # type: ignore[index]


def test_a_right_current_password_still_works_and_resets_the_count(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    user = create_user(users)
    token = login_pair(channel, user.email).access_token
    stub = UserServiceStub(channel)
    for n in range(MAX_FAILURES - 1):
        assert _change(stub, user.id, token, f"wrong {n}") == grpc.StatusCode.INVALID_ARGUMENT
    assert _change(stub, user.id, token, PASSWORD) == grpc.StatusCode.OK
    assert stored_user(db, user.id)["failed_login_count"] == 0  # type: ignore[index]
    assert login_pair(channel, user.email, NEW_PASSWORD).access_token
