"""Refresh rotation and reuse detection, revocation within the bound, login hardening (lockout,
one generic message, rehash), common passwords, and secrets kept out of the logs."""

from __future__ import annotations

import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import update
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    Refusal,
    anonymous_refusal,
    bearer,
    code_of,
    create_user,
    failure_of,
    login_pair,
    service_token_for,
    status_of,
    unique_email,
    user_row,
    wait_for_code,
)
from tests.e2e.conftest import CapturedLogs
from tests.support import ServerThread, make_settings
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import refresh_tokens
from usersvc.adapters.tables import users as users_table
from usersvc.services.auth import hash_refresh_token

OK = grpc.StatusCode.OK
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
MAX_FAILURES = 10  # the default of login_max_failures, which the session server uses
LOCK_SECONDS = 900  # the default of login_lock_seconds
REVOCATION_BOUND_SECONDS = 5.0


@pytest.fixture(scope="module")
def generic(channel: grpc.Channel) -> Refusal:
    return anonymous_refusal(channel)


@pytest.fixture(scope="module")
def second_server(database_url: str) -> Iterator[ServerThread]:
    """Another replica on the same database, caching token states for 2 s."""
    with tempfile.TemporaryDirectory() as data_dir:
        thread = ServerThread(make_settings(database_url, data_dir, token_cache_seconds=2)).start()
        yield thread
        thread.stop()


@pytest.fixture(scope="module")
def second_channel(second_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(second_server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def get_self(channel: grpc.Channel, user_id: str, token: str) -> Callable[[], object]:
    stub = UserServiceStub(channel)
    return lambda: stub.GetUser(pb.GetUserRequest(id=user_id), metadata=bearer(token))


def refresh(auth: AuthServiceStub, token: str) -> auth_pb.TokenPair:
    pair: auth_pb.TokenPair = auth.RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=token)
    ).tokens
    return pair


# --- Refresh rotation ---------------------------------------------------------------------------


def test_each_refresh_token_works_once(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    seen = {pair.refresh_token}
    for _ in range(3):
        new = refresh(auth, pair.refresh_token)
        assert new.refresh_token not in seen
        assert new.token_type == "Bearer"
        assert code_of(get_self(channel, user.id, new.access_token)) == OK
        seen.add(new.refresh_token)
        pair = new
    first = sorted(seen - {pair.refresh_token})[0]
    assert Refusal.of(failure_of(lambda: refresh(auth, first))) == generic


def test_token_pair_fields_describe_the_tokens(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub, server: ServerThread
) -> None:
    user = create_user(users)
    logged_in = login_pair(channel, user.email)
    refreshed = refresh(auth, login_pair(channel, user.email).refresh_token)
    for pair in (logged_in, refreshed):
        claims = jwt.decode(pair.access_token, options={"verify_signature": False})
        assert pair.token_type == "Bearer"
        assert pair.access_token_expire_time.seconds == claims["exp"]
        assert claims["exp"] - claims["iat"] == server.settings.access_token_ttl_seconds
        assert claims["sub"] == user.id
    login_time = jwt.decode(logged_in.access_token, options={"verify_signature": False})["iat"]
    refresh_ttl = logged_in.refresh_token_expire_time.seconds - login_time
    assert abs(refresh_ttl - server.settings.refresh_token_ttl_seconds) <= 1


def test_an_expired_refresh_token_is_refused(
    auth: AuthServiceStub,
    channel: grpc.Channel,
    users: UserServiceStub,
    db: Engine,
    generic: Refusal,
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    with db.begin() as conn:
        conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.token_hash == hash_refresh_token(pair.refresh_token))
            .values(expire_time=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert Refusal.of(failure_of(lambda: refresh(auth, pair.refresh_token))) == generic


def test_rotation_keeps_the_expiry_of_the_login(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub
) -> None:
    user = create_user(users)
    first = login_pair(channel, user.email)
    time.sleep(1.1)
    second = refresh(auth, first.refresh_token)
    drift = second.refresh_token_expire_time.ToNanoseconds() - (
        first.refresh_token_expire_time.ToNanoseconds()
    )
    assert abs(drift) < 500_000_000  # the same absolute expiry, give or take rounding


def test_reuse_revokes_the_whole_family_and_only_it(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    user = create_user(users)
    first = login_pair(channel, user.email).refresh_token
    second = refresh(auth, first).refresh_token
    newest = refresh(auth, second).refresh_token
    other_login = login_pair(channel, user.email).refresh_token

    assert Refusal.of(failure_of(lambda: refresh(auth, first))) == generic  # reuse
    # The thief may hold the newest token: it is dead too.
    assert Refusal.of(failure_of(lambda: refresh(auth, newest))) == generic
    # Another login of the same user is another family.
    assert refresh(auth, other_login).access_token


def test_concurrent_use_of_one_refresh_token_lets_exactly_one_through(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub
) -> None:
    user = create_user(users)
    token = login_pair(channel, user.email).refresh_token

    def attempt(_: int) -> auth_pb.TokenPair | grpc.StatusCode:
        try:
            return refresh(auth, token)
        except grpc.RpcError as err:
            return status_of(err)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, range(4)))
    winners = [r for r in results if isinstance(r, auth_pb.TokenPair)]
    assert len(winners) == 1  # the first use is legitimate, every other one a reuse
    assert [r for r in results if not isinstance(r, auth_pb.TokenPair)] == [UNAUTH] * (
        4 - len(winners)
    )
    # Every use after the first was a reuse: the winner's new token went with the family.
    assert code_of(lambda: refresh(auth, winners[0].refresh_token)) == UNAUTH


def test_logout_revokes_the_family(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    user = create_user(users)
    first = login_pair(channel, user.email).refresh_token
    second = refresh(auth, first).refresh_token
    other_login = login_pair(channel, user.email).refresh_token

    auth.Logout(auth_pb.LogoutRequest(refresh_token=second))
    assert Refusal.of(failure_of(lambda: refresh(auth, second))) == generic
    assert refresh(auth, other_login).refresh_token
    unknown = failure_of(lambda: auth.Logout(auth_pb.LogoutRequest(refresh_token="no-such")))
    assert Refusal.of(unknown) == generic


def test_disabled_user_cannot_refresh_or_log_in(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    users.DisableUser(pb.DisableUserRequest(id=user.id))
    assert Refusal.of(failure_of(lambda: refresh(auth, pair.refresh_token))) == generic
    assert Refusal.of(failure_of(lambda: login_pair(channel, user.email))) == generic
    users.EnableUser(pb.EnableUserRequest(id=user.id))
    # Disabling revoked the old tokens for good; a new login works again.
    assert Refusal.of(failure_of(lambda: refresh(auth, pair.refresh_token))) == generic
    assert Refusal.of(failure_of(get_self(channel, user.id, pair.access_token))) == generic
    assert login_pair(channel, user.email).access_token


# --- Revocation ---------------------------------------------------------------------------------

REVOCATIONS = [
    "change_password_by_admin",
    "change_password_by_self",
    "disable",
    "delete",
    "roles_change",
]


def revoke(
    kind: str, users: UserServiceStub, channel: grpc.Channel, user: user_pb2.User, token: str
) -> None:
    if kind == "change_password_by_admin":
        users.ChangePassword(pb.ChangePasswordRequest(id=user.id, new_password=OTHER_PASSWORD))
    elif kind == "change_password_by_self":
        UserServiceStub(channel).ChangePassword(
            pb.ChangePasswordRequest(
                id=user.id, current_password=PASSWORD, new_password=OTHER_PASSWORD
            ),
            metadata=bearer(token),
        )
    elif kind == "disable":
        users.DisableUser(pb.DisableUserRequest(id=user.id))
    elif kind == "delete":
        users.DeleteUser(pb.DeleteUserRequest(id=user.id))
    elif kind == "roles_change":
        users.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=user.id, roles=["service"]),
                update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
            )
        )
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", REVOCATIONS)
def test_revocation_is_immediate_on_the_same_server(
    kind: str,
    auth: AuthServiceStub,
    channel: grpc.Channel,
    users: UserServiceStub,
    generic: Refusal,
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    assert code_of(get_self(channel, user.id, pair.access_token)) == OK
    revoke(kind, users, channel, user, pair.access_token)
    assert Refusal.of(failure_of(get_self(channel, user.id, pair.access_token))) == generic
    assert Refusal.of(failure_of(lambda: refresh(auth, pair.refresh_token))) == generic
    if kind not in ("disable", "delete"):
        # Only the old tokens died: a new login works, with the new password if it changed.
        password = PASSWORD if kind == "roles_change" else OTHER_PASSWORD
        fresh = login_pair(channel, user.email, password)
        assert code_of(get_self(channel, user.id, fresh.access_token)) == OK


@pytest.mark.parametrize("kind", REVOCATIONS)
def test_revocation_reaches_another_replica_within_the_bound(
    kind: str,
    channel: grpc.Channel,
    second_channel: grpc.Channel,
    users: UserServiceStub,
    generic: Refusal,
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    on_second = get_self(second_channel, user.id, pair.access_token)
    assert code_of(on_second) == OK  # warms the second server's cache

    revoke(kind, users, channel, user, pair.access_token)
    started = time.monotonic()
    # Refresh tokens live in the database: revoked at once, on every replica.
    second_auth = AuthServiceStub(second_channel)
    assert Refusal.of(failure_of(lambda: refresh(second_auth, pair.refresh_token))) == generic

    code, seen = wait_for_code(on_second, UNAUTH, timeout=REVOCATION_BOUND_SECONDS)
    elapsed = time.monotonic() - started
    assert code == UNAUTH, f"still accepted after {elapsed:.1f} s"
    # Until then the old token still works (for a deleted user: there is nothing to get).
    still_accepted = grpc.StatusCode.NOT_FOUND if kind == "delete" else OK
    assert set(seen) <= {still_accepted, UNAUTH}
    assert elapsed <= REVOCATION_BOUND_SECONDS + 1  # one poll interval and a call of slack
    assert Refusal.of(failure_of(on_second)) == generic


def test_fresh_token_works_at_once_on_a_replica_that_cached_the_old_version(
    channel: grpc.Channel, second_channel: grpc.Channel, users: UserServiceStub
) -> None:
    user = create_user(users)
    old = login_pair(channel, user.email).access_token
    assert code_of(get_self(second_channel, user.id, old)) == OK  # caches token version 1
    users.ChangePassword(pb.ChangePasswordRequest(id=user.id, new_password=OTHER_PASSWORD))
    fresh = login_pair(channel, user.email, OTHER_PASSWORD).access_token  # token version 2
    assert code_of(get_self(channel, user.id, fresh)) == OK  # the issuing replica accepts it
    # A token the service has just issued must work on every replica.
    assert code_of(get_self(second_channel, user.id, fresh)) == OK


# --- Lockout ------------------------------------------------------------------------------------


def fail_logins(channel: grpc.Channel, emails: list[str]) -> list[Refusal]:
    return [
        Refusal.of(failure_of(lambda e=email: login_pair(channel, e, "wrong password!!")))  # type: ignore[misc]
        for email in emails
    ]


def test_ten_failures_lock_the_account(
    channel: grpc.Channel, users: UserServiceStub, db: Engine, server: ServerThread
) -> None:
    assert server.settings.login_max_failures == MAX_FAILURES
    assert server.settings.login_lock_seconds == LOCK_SECONDS
    user = create_user(users)
    refusals = fail_logins(channel, [user.email] * MAX_FAILURES)
    assert len(set(refusals)) == 1
    assert refusals[0].code == UNAUTH
    stored = user_row(db, user.id)
    assert stored["failed_login_count"] == MAX_FAILURES
    assert stored["locked_until"] is not None
    remaining = stored["locked_until"] - datetime.now(UTC)
    assert timedelta(seconds=LOCK_SECONDS - 60) < remaining <= timedelta(seconds=LOCK_SECONDS)
    # The correct password now gets exactly the refusal of a wrong one.
    assert Refusal.of(failure_of(lambda: login_pair(channel, user.email))) == refusals[0]


def test_failures_below_the_limit_do_not_lock_and_success_resets_the_count(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    fail_logins(channel, [user.email] * (MAX_FAILURES - 1))
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (MAX_FAILURES - 1, None)
    assert login_pair(channel, user.email).access_token
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (0, None)


def test_concurrent_failures_are_all_counted_and_lock_once(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda _: code_of(lambda: login_pair(channel, user.email, "wrong password!!")),
                range(2 * MAX_FAILURES),
            )
        )
    assert codes == [UNAUTH] * (2 * MAX_FAILURES)
    stored = user_row(db, user.id)
    # Counting stops at the lock: none lost to a race, none counted during the lock.
    assert stored["failed_login_count"] == MAX_FAILURES
    assert stored["locked_until"] is not None
    assert code_of(lambda: login_pair(channel, user.email)) == UNAUTH


def test_attempts_during_a_lock_do_not_extend_it(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    fail_logins(channel, [user.email] * MAX_FAILURES)
    before = user_row(db, user.id)
    assert before["locked_until"] is not None
    time.sleep(0.05)  # a re-lock would land measurably later
    fail_logins(channel, [user.email] * 3)
    assert code_of(lambda: login_pair(channel, user.email)) == UNAUTH
    after = user_row(db, user.id)
    assert after["locked_until"] == before["locked_until"]
    assert after["failed_login_count"] == before["failed_login_count"]


def test_an_expired_lock_lets_the_correct_password_in(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    fail_logins(channel, [user.email] * MAX_FAILURES)
    assert code_of(lambda: login_pair(channel, user.email)) == UNAUTH
    with db.begin() as conn:
        conn.execute(
            update(users_table)
            .where(users_table.c.id == uuid.UUID(user.id))
            .values(locked_until=datetime.now(UTC) - timedelta(minutes=1))
        )
    assert login_pair(channel, user.email).access_token
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (0, None)


def test_counting_starts_again_after_a_lock_expired(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    fail_logins(channel, [user.email] * MAX_FAILURES)
    with db.begin() as conn:
        conn.execute(
            update(users_table)
            .where(users_table.c.id == uuid.UUID(user.id))
            .values(locked_until=datetime.now(UTC) - timedelta(minutes=1))
        )
    fail_logins(channel, [user.email])
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (1, None)
    assert login_pair(channel, user.email).access_token


def test_email_case_variants_share_one_counter(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    local = f"Case-{uuid.uuid4().hex[:10]}"
    user = create_user(users, email=f"{local.lower()}@example.com")
    variants = [
        f"{local}@Example.com",
        f"{local.upper()}@EXAMPLE.COM",
        f"  {local.lower()}@example.com ",
        f"{local.swapcase()}@example.COM",
        f"{local.lower()}@ＥＸＡＭＰＬＥ.com",  # full-width letters, NFKC-normalised
    ]
    fail_logins(channel, (variants * 2)[:MAX_FAILURES])
    stored = user_row(db, user.id)
    assert stored["failed_login_count"] == MAX_FAILURES
    assert stored["locked_until"] is not None
    assert code_of(lambda: login_pair(channel, user.email)) == UNAUTH


# --- One generic login failure ------------------------------------------------------------------


def test_every_login_failure_looks_the_same(
    channel: grpc.Channel, users: UserServiceStub, server: ServerThread
) -> None:
    wrong = create_user(users)
    disabled = create_user(users)
    users.DisableUser(pb.DisableUserRequest(id=disabled.id))
    locked = create_user(users)
    fail_logins(channel, [locked.email] * MAX_FAILURES)
    subject = f"generic-{uuid.uuid4().hex[:8]}"
    service_token_for(server.settings, subject)  # creates the service account

    attempts = {
        "unknown email": (unique_email("nobody"), PASSWORD),
        "wrong password": (wrong.email, "not the password"),
        "disabled account": (disabled.email, PASSWORD),
        "locked account": (locked.email, PASSWORD),
        "service account": (f"{subject}@service.invalid", PASSWORD),
        "service account, marker as password": (f"{subject}@service.invalid", "!service-account"),
    }
    refusals = {
        what: Refusal.of(failure_of(lambda e=email, p=password: login_pair(channel, e, p)))  # type: ignore[misc]
        for what, (email, password) in attempts.items()
    }
    assert len(set(refusals.values())) == 1, refusals
    assert refusals["unknown email"].code == UNAUTH


# --- Rehash on login ----------------------------------------------------------------------------


def test_login_rehashes_when_the_parameters_changed(
    database_url: str, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)  # hashed by the session server: time cost 2
    old_hash = user_row(db, user.id)["password_hash"]
    assert re.search(r"\$argon2id\$v=19\$m=19456,t=2,p=1\$", old_hash)

    with tempfile.TemporaryDirectory() as data_dir:
        stronger = ServerThread(make_settings(database_url, data_dir, argon2_time_cost=3)).start()
        try:
            with grpc.insecure_channel(stronger.address) as ch:
                assert login_pair(ch, user.email).access_token
                new_hash = user_row(db, user.id)["password_hash"]
                # Now current: a second login leaves the hash alone.
                assert login_pair(ch, user.email).access_token
                assert user_row(db, user.id)["password_hash"] == new_hash
        finally:
            stronger.stop()
    assert new_hash != old_hash
    assert re.search(r"\$argon2id\$v=19\$m=19456,t=3,p=1\$", new_hash)
    # A rehash is not a change of the resource.
    after = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert after.etag == user.etag
    assert after.update_time == user.update_time


# --- Common passwords ---------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["password123", "qwerty123"])
def test_create_user_refuses_a_common_password(users: UserServiceStub, password: str) -> None:
    email = unique_email("common")
    details = failure_of(
        lambda: users.CreateUser(
            pb.CreateUserRequest(email=email, name="Com Mon", password=password)
        )
    )
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.violations) == ["password"]
    assert "common" in details.violations["password"].lower()
    assert users.ListUsers(pb.ListUsersRequest(email=email)).total_size == 0


@pytest.mark.parametrize("password", ["password123", "qwerty123"])
@pytest.mark.parametrize("caller", ["admin", "self"])
def test_change_password_refuses_a_common_password(
    users: UserServiceStub, channel: grpc.Channel, password: str, caller: str
) -> None:
    user = create_user(users)
    request = pb.ChangePasswordRequest(id=user.id, new_password=password)
    if caller == "admin":
        details = failure_of(lambda: users.ChangePassword(request))
    else:
        request.current_password = PASSWORD
        token = login_pair(channel, user.email).access_token
        stub = UserServiceStub(channel)
        details = failure_of(lambda: stub.ChangePassword(request, metadata=bearer(token)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.violations) == ["new_password"]
    assert "common" in details.violations["new_password"].lower()
    assert login_pair(channel, user.email, PASSWORD).access_token  # unchanged
    assert code_of(lambda: login_pair(channel, user.email, password)) == UNAUTH


# --- Logs ---------------------------------------------------------------------------------------


def test_no_password_hash_or_token_in_the_logs(
    auth: AuthServiceStub,
    channel: grpc.Channel,
    users: UserServiceStub,
    db: Engine,
    logs: CapturedLogs,
) -> None:
    wrong_password = "a wrong guess 31337"
    user = create_user(users)
    password_hash = user_row(db, user.id)["password_hash"]

    assert code_of(lambda: login_pair(channel, user.email, wrong_password)) == UNAUTH
    first = login_pair(channel, user.email)
    assert code_of(get_self(channel, user.id, first.access_token)) == OK
    second = refresh(auth, first.refresh_token)
    assert code_of(lambda: refresh(auth, first.refresh_token)) == UNAUTH  # reuse: a warning
    third = login_pair(channel, user.email)
    auth.Logout(auth_pb.LogoutRequest(refresh_token=third.refresh_token))
    assert code_of(get_self(channel, user.id, third.access_token + "x")) == UNAUTH
    users.ChangePassword(pb.ChangePasswordRequest(id=user.id, new_password=OTHER_PASSWORD))

    lines = logs.wait_for(lambda x: x.get("method") == "/userservice.v1.UserService/ChangePassword")
    assert lines, "the access log was not captured"
    methods = {line.get("method") for line in logs.lines()}
    assert {
        "/userservice.v1.AuthService/Login",
        "/userservice.v1.AuthService/RefreshToken",
        "/userservice.v1.AuthService/Logout",
    } <= methods
    text = logs.text
    secrets = {
        "password": PASSWORD,
        "wrong password": wrong_password,
        "new password": OTHER_PASSWORD,
        "password hash": password_hash,
        "hash digest": password_hash.rsplit("$", 1)[-1],
        "new password hash": user_row(db, user.id)["password_hash"],
    }
    for n, pair in enumerate((first, second, third)):
        secrets[f"access token {n}"] = pair.access_token
        secrets[f"access token {n} signature"] = pair.access_token.rsplit(".", 1)[-1]
        secrets[f"refresh token {n}"] = pair.refresh_token
    leaked = [what for what, secret in secrets.items() if secret in text]
    assert leaked == []
