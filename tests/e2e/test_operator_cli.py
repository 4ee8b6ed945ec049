"""The operator CLI as a subprocess on the session server's database and signing key."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator

import grpc
import jwt
import pytest

from tests.e2e.auth_helpers import (
    PASSWORD,
    Refusal,
    anonymous_refusal,
    bearer,
    cli_env,
    code_of,
    create_user,
    failure_of,
    login_pair,
    run_cli,
    unique_email,
)
from tests.support import ServerThread, details_of
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def env(server: ServerThread) -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory() as data_dir:
        yield cli_env(server.settings.effective_database_url, data_dir)


@pytest.fixture(scope="module")
def billing_token(env: dict[str, str]) -> str:
    """`usersvc issue-service-token --subject billing --ttl 1h`, run once per database."""
    result = run_cli(["issue-service-token", "--subject", "billing", "--ttl", "1h"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # only the token on stdout: scripts can capture it
    return lines[0]


def list_users(channel: grpc.Channel, token: str) -> Refusal | pb.ListUsersResponse:
    stub = UserServiceStub(channel)
    try:
        response: pb.ListUsersResponse = stub.ListUsers(
            pb.ListUsersRequest(page_size=1), metadata=bearer(token)
        )
    except grpc.RpcError as err:
        return Refusal.of(details_of(err))
    return response


def find_by_email(users: UserServiceStub, email: str) -> user_pb2.User:
    found = users.ListUsers(pb.ListUsersRequest(email=email)).users
    assert len(found) == 1, email
    return found[0]


def test_create_admin_creates_an_admin_who_can_log_in(
    env: dict[str, str], channel: grpc.Channel, users: UserServiceStub
) -> None:
    email = unique_email("cli-admin")
    result = run_cli(
        ["create-admin", "--email", email, "--name", "Cli Admin"], env, PASSWORD + "\n"
    )
    assert result.returncode == 0, result.stderr
    assert f"created admin {email}" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr

    token = login_pair(channel, email, PASSWORD).access_token
    assert isinstance(list_users(channel, token), pb.ListUsersResponse)
    admin = find_by_email(users, email)
    assert list(admin.roles) == ["admin"]
    assert admin.name == "Cli Admin"


def test_create_admin_again_promotes_the_existing_user(
    env: dict[str, str], channel: grpc.Channel, users: UserServiceStub
) -> None:
    user = create_user(users)
    assert list(user.roles) == []
    # Not used before the promotion: a token check here would put the user's token version in
    # the server's cache, and then the fresh token below hits the bug that
    # test_tokens_and_login.test_fresh_token_works_at_once_on_a_replica_that_cached_the_old_version
    # describes.
    old_token = login_pair(channel, user.email).access_token

    result = run_cli(
        ["create-admin", "--email", user.email.upper(), "--name", "Ignored"],
        env,
        "some other password 42\n",
    )
    assert result.returncode == 0, result.stderr
    assert f"promoted admin {user.email}" in result.stdout

    promoted = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert "admin" in promoted.roles
    assert promoted.name == user.name  # promotion changes the roles only
    # The password stays the user's own; a new login carries the admin role.
    token = login_pair(channel, user.email, PASSWORD).access_token
    assert isinstance(list_users(channel, token), pb.ListUsersResponse)
    # The token from before the promotion was revoked with it.
    assert list_users(channel, old_token) == anonymous_refusal(channel)


def test_create_admin_refuses_a_common_password(
    env: dict[str, str], users: UserServiceStub
) -> None:
    email = unique_email("cli-common")
    result = run_cli(["create-admin", "--email", email, "--name", "Weak"], env, "password123\n")
    assert result.returncode == 1
    assert "common" in result.stderr
    assert "password123" not in result.stdout + result.stderr
    assert users.ListUsers(pb.ListUsersRequest(email=email)).total_size == 0


def test_issue_service_token_prints_a_service_jwt(
    billing_token: str, channel: grpc.Channel, users: UserServiceStub
) -> None:
    header = jwt.get_unverified_header(billing_token)
    claims = jwt.decode(billing_token, options={"verify_signature": False})
    assert header["alg"] == "ES256"
    assert claims["roles"] == ["service"]
    assert claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == 3600
    account = find_by_email(users, "billing@service.invalid")
    assert claims["sub"] == account.id
    assert list(account.roles) == ["service"]

    listed = list_users(channel, billing_token)
    assert isinstance(listed, pb.ListUsersResponse)
    assert listed.total_size >= 1
    # A service is not an admin.
    stub = UserServiceStub(channel)
    denied = code_of(
        lambda: stub.DeleteUser(pb.DeleteUserRequest(id=account.id), metadata=bearer(billing_token))
    )
    assert denied == DENIED


def test_service_account_cannot_log_in_with_any_password(
    billing_token: str, channel: grpc.Channel
) -> None:
    generic = anonymous_refusal(channel)
    for password in ("", "!service-account", PASSWORD, billing_token):
        refusal = Refusal.of(
            failure_of(lambda p=password: login_pair(channel, "billing@service.invalid", p))  # type: ignore[misc]
        )
        assert refusal == generic  # the one generic refusal, as for a wrong password
    # The account exists and works with its token: the refusal is about password login only.
    assert isinstance(list_users(channel, billing_token), pb.ListUsersResponse)


@pytest.mark.parametrize("action", ["disable", "delete"])
def test_disabling_or_deleting_a_service_account_makes_its_token_fail(
    action: str, env: dict[str, str], channel: grpc.Channel, users: UserServiceStub
) -> None:
    subject = f"svc-{uuid.uuid4().hex[:8]}"
    result = run_cli(["issue-service-token", "--subject", subject, "--ttl", "15m"], env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert isinstance(list_users(channel, token), pb.ListUsersResponse)

    account = find_by_email(users, f"{subject}@service.invalid")
    if action == "disable":
        users.DisableUser(pb.DisableUserRequest(id=account.id))
    else:
        users.DeleteUser(pb.DeleteUserRequest(id=account.id))
    assert list_users(channel, token) == anonymous_refusal(channel)

    # A deleted account is kept (soft delete) until its purge: no new token either.
    again = run_cli(["issue-service-token", "--subject", subject], env)
    assert again.returncode == 1
    assert ("disabled" if action == "disable" else "deleted") in again.stderr
    assert again.stdout == ""


@pytest.mark.parametrize("args", [["--subject", "Not A Name"], ["--subject", "ok", "--ttl", "0"]])
def test_issue_service_token_refuses_bad_arguments(env: dict[str, str], args: list[str]) -> None:
    result = run_cli(["issue-service-token", *args], env)
    assert result.returncode != 0
    assert result.stdout == ""
