"""Data integrity through real stubs, on SQLite and PostgreSQL: etags, idempotent CreateUser,
uniqueness under concurrent calls, and bounded retries of transaction conflicts.

Concurrent calls are started with `stub.Method.future(...)` before any is waited for; the
server runs them on its event loop, each in its own unit of work.
"""

from __future__ import annotations

import functools
import random
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy import exc, func, insert, select, update
from sqlalchemy.engine import Engine

from tests.e2e.integrity_helpers import (
    Outcome,
    all_events,
    audit_rows,
    code_of,
    codes,
    create_user,
    fire,
    login,
    mask,
    new_password,
    stored_user,
    stub_as,
    unique_email,
    users_with_email,
    with_components,
)
from tests.secrets_registry import record_secrets
from tests.support import ServerThread, details_of
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.refresh_token_repository import RefreshTokenRepository
from usersvc.adapters.tables import idempotency_keys
from usersvc.adapters.tables import users as users_table
from usersvc.adapters.user_repository import UserRepository
from usersvc.bootstrap import Components
from usersvc.domain.errors import RetryableConflict
from usersvc.domain.validation import normalize_email
from usersvc.services.transactions import MAX_ATTEMPTS

OK = grpc.StatusCode.OK
ABORTED = grpc.StatusCode.ABORTED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS


def _expect_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc_info:
        call()
    return exc_info.value


def _reasons(outcomes: list[Outcome]) -> set[str]:
    return {details_of(o.error).reason for o in outcomes if o.error is not None}


# --- etags -----------------------------------------------------------------------------------


def test_the_etag_changes_on_every_change_of_the_user(users: UserServiceStub) -> None:
    user, _ = create_user(users)
    seen = [user.etag]
    user = users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Etag Two", etag=user.etag),
            update_mask=mask("name"),
        )
    ).user
    seen.append(user.etag)
    user = users.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, new_password=new_password(), etag=user.etag)
    ).user
    seen.append(user.etag)
    user = users.DisableUser(pb.DisableUserRequest(id=user.id, etag=user.etag)).user
    seen.append(user.etag)
    user = users.EnableUser(pb.EnableUserRequest(id=user.id, etag=user.etag)).user
    seen.append(user.etag)
    user = users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, roles=["service"], etag=user.etag),
            update_mask=mask("roles"),
        )
    ).user
    seen.append(user.etag)
    assert all(seen)
    assert len(set(seen)) == len(seen) == 6
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user.etag == seen[-1]


def _make_stale(users: UserServiceStub, user: user_pb2.User) -> user_pb2.User:
    """Change the user once more, so `user.etag` is stale; returns the current user."""
    current: user_pb2.User = users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Moved On"), update_mask=mask("name")
        )
    ).user
    assert current.etag != user.etag
    return current


def _stale_update(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Lost Update", email=unique_email(), etag=etag),
            update_mask=mask("name", "email"),
        )
    )


def _stale_delete(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.DeleteUser(pb.DeleteUserRequest(id=user.id, etag=etag))


def _stale_password(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, new_password="stale etag passphrase 9", etag=etag)
    )


def _stale_disable(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.DisableUser(pb.DisableUserRequest(id=user.id, etag=etag))


def _stale_enable(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.EnableUser(pb.EnableUserRequest(id=user.id, etag=etag))


def _stale_unlock(users: UserServiceStub, user: user_pb2.User, etag: str) -> Any:
    return users.UnlockUser(pb.UnlockUserRequest(id=user.id, etag=etag))


STALE_CALLS: dict[str, Callable[[UserServiceStub, user_pb2.User, str], Any]] = {
    "UpdateUser": _stale_update,
    "DeleteUser": _stale_delete,
    "ChangePassword": _stale_password,
    "DisableUser": _stale_disable,
    "EnableUser": _stale_enable,
    "UnlockUser": _stale_unlock,
}


@pytest.mark.parametrize("method", list(STALE_CALLS))
@pytest.mark.parametrize("kind", ["stale", "never-issued"])
def test_a_stale_etag_is_aborted_and_changes_nothing(
    users: UserServiceStub,
    channel: grpc.Channel,
    db: Engine,
    method: str,
    kind: str,
) -> None:
    user, password = create_user(users)
    if method == "EnableUser":
        user = users.DisableUser(pb.DisableUserRequest(id=user.id)).user
    current = _make_stale(users, user)
    if method == "UnlockUser":
        # A failure to clear; counting it changes no etag.
        with pytest.raises(grpc.RpcError):
            login(channel, user.email, "wrong!!wrong")
        current = users.GetUser(pb.GetUserRequest(id=user.id)).user
        assert current.failed_login_count == 1
    etag = user.etag if kind == "stale" else 'W/"not-an-etag"'
    row_before = stored_user(db, user.id)
    audit_before = audit_rows(db, user.id)
    details = details_of(_expect_error(lambda: STALE_CALLS[method](users, user, etag)))
    assert details.code == ABORTED
    assert details.reason == "ETAG_MISMATCH"
    assert stored_user(db, user.id) == row_before
    assert audit_rows(db, user.id) == audit_before
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == current
    if method == "ChangePassword":
        login(channel, user.email, password)  # the old password still works
    # Control: the current etag is accepted.
    STALE_CALLS[method](users, current, current.etag)


def test_20_concurrent_updates_with_one_etag_have_exactly_one_winner(
    users: UserServiceStub, db: Engine
) -> None:
    user, _ = create_user(users)
    names = [f"Racer {n:02d}" for n in range(20)]
    outcomes = fire(
        [
            functools.partial(
                users.UpdateUser.future,
                pb.UpdateUserRequest(
                    user=user_pb2.User(id=user.id, name=name, etag=user.etag),
                    update_mask=mask("name"),
                ),
            )
            for name in names
        ]
    )
    assert codes(outcomes) == {OK: 1, ABORTED: 19}
    assert _reasons(outcomes) == {"ETAG_MISMATCH"}
    (winner,) = [o.response.user for o in outcomes if o.code == OK]
    assert winner.name in names
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == winner
    row = stored_user(db, user.id)
    assert row is not None
    assert (row["name"], row["version"]) == (winner.name, 2)
    updates = [e for e in all_events(users, user.id) if e.action == "user.updated"]
    assert len(updates) == 1
    assert updates[0].create_time == winner.update_time


def test_20_concurrent_disables_have_exactly_one_winner(users: UserServiceStub) -> None:
    """The state check and the write are atomic too: one disable, 19 already disabled."""
    user, _ = create_user(users)
    request = pb.DisableUserRequest(id=user.id)
    outcomes = fire([functools.partial(users.DisableUser.future, request) for _ in range(20)])
    assert codes(outcomes) == {OK: 1, grpc.StatusCode.FAILED_PRECONDITION: 19}
    assert _reasons(outcomes) == {"USER_ALREADY_DISABLED"}
    actions = [e.action for e in all_events(users, user.id)]
    assert actions == ["user.disabled", "user.created"]


def test_20_concurrent_deletes_have_exactly_one_winner(users: UserServiceStub, db: Engine) -> None:
    user, _ = create_user(users)
    request = pb.DeleteUserRequest(id=user.id, etag=user.etag)
    outcomes = fire([functools.partial(users.DeleteUser.future, request) for _ in range(20)])
    counted = codes(outcomes)
    assert counted.get(OK) == 1
    # The others find the user gone, or (if they read it first) its etag no longer current.
    assert set(counted) <= {OK, grpc.StatusCode.NOT_FOUND, ABORTED}
    assert sum(counted.values()) == 20
    stored = stored_user(db, user.id)
    assert stored is not None and stored["state"] == "deleted"
    actions = [e.action for e in all_events(users, user.id)]
    assert actions == ["user.deleted", "user.created"]


# --- idempotent CreateUser -------------------------------------------------------------------


def _create_request(
    email: str, password: str, request_id: str, name: str = "Idempotent"
) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(email=email, name=name, password=password, request_id=request_id)


def _idempotency_rows(db: Engine, request_id: str) -> list[Any]:
    with db.connect() as conn:
        return list(
            conn.execute(
                select(idempotency_keys).where(idempotency_keys.c.request_id == request_id)
            ).mappings()
        )


def test_a_retry_with_the_same_request_id_returns_the_original_user(
    users: UserServiceStub, db: Engine
) -> None:
    email, password, request_id = unique_email("idem"), new_password(), str(uuid.uuid4())
    first = users.CreateUser(_create_request(email, password, request_id))
    again = users.CreateUser(_create_request(email.upper(), password, request_id.upper()))
    assert again == first
    assert len(users_with_email(db, email)) == 1
    assert [e.action for e in all_events(users, first.user.id)] == ["user.created"]
    assert len(_idempotency_rows(db, request_id)) == 1


@pytest.mark.parametrize("changed", ["email", "name", "password"])
def test_the_same_request_id_with_another_payload_is_invalid_argument(
    users: UserServiceStub, db: Engine, changed: str
) -> None:
    email, password, request_id = unique_email("idem"), new_password(), str(uuid.uuid4())
    first = users.CreateUser(_create_request(email, password, request_id)).user
    other_email = unique_email("idem-other")
    request = _create_request(
        other_email if changed == "email" else email,
        new_password() if changed == "password" else password,
        request_id,
        name="Someone Else" if changed == "name" else "Idempotent",
    )
    details = details_of(_expect_error(lambda: users.CreateUser(request)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "REQUEST_ID_REUSED"
    assert list(details.violations) == ["request_id"]
    assert users_with_email(db, other_email) == []
    assert [e.action for e in all_events(users, first.id)] == ["user.created"]


def test_the_same_request_id_from_another_caller_is_another_request(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    service, service_password = create_user(users)
    users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=service.id, roles=["service"]), update_mask=mask("roles")
        )
    )
    as_service = stub_as(channel, service.email, service_password)
    request_id, password = str(uuid.uuid4()), new_password()
    mine = users.CreateUser(_create_request(unique_email("idem-a"), password, request_id)).user
    theirs = as_service.CreateUser(
        _create_request(unique_email("idem-b"), password, request_id)
    ).user
    assert theirs.id != mine.id
    assert len(_idempotency_rows(db, request_id)) == 2
    events = all_events(users, theirs.id)
    assert [(e.action, e.actor) for e in events] == [("user.created", service.id)]


@pytest.mark.parametrize("bad", ["not-a-uuid", "1234", f"{uuid.uuid4()}0"])
def test_a_malformed_request_id_is_invalid_argument(users: UserServiceStub, bad: str) -> None:
    request = _create_request(unique_email("idem"), new_password(), bad)
    details = details_of(_expect_error(lambda: users.CreateUser(request)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.violations) == ["request_id"]


def test_20_concurrent_creates_with_one_request_id_make_one_user(
    users: UserServiceStub, db: Engine
) -> None:
    email, password, request_id = unique_email("idem-race"), new_password(), str(uuid.uuid4())
    request = _create_request(email, password, request_id)
    outcomes = fire([functools.partial(users.CreateUser.future, request) for _ in range(20)])
    rows = users_with_email(db, email)
    assert len(rows) == 1
    assert [e.action for e in all_events(users, str(rows[0]["id"]))] == ["user.created"]
    assert codes(outcomes) == {OK: 20}, _reasons(outcomes)
    assert all(o.response == outcomes[0].response for o in outcomes)


def _age_key(db: Engine, request_id: str, age: timedelta) -> None:
    with db.begin() as conn:
        changed = conn.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.request_id == request_id)
            .values(create_time=datetime.now(UTC) - age)
        ).rowcount
    assert changed == 1


def _purge(server: ServerThread) -> int:
    async def purge(c: Components) -> int:
        return await c.users.purge_idempotency_keys()

    purged: int = with_components(server.settings, purge)
    return purged


def test_request_ids_are_kept_24_hours_then_purged(
    users: UserServiceStub, db: Engine, server: ServerThread
) -> None:
    assert server.settings.idempotency_ttl_seconds >= 24 * 3600
    password = new_password()
    young_email, young_id = unique_email("idem-young"), str(uuid.uuid4())
    old_email, old_id = unique_email("idem-old"), str(uuid.uuid4())
    young = users.CreateUser(_create_request(young_email, password, young_id))
    old = users.CreateUser(_create_request(old_email, password, old_id))
    _age_key(db, young_id, timedelta(hours=23))
    _age_key(db, old_id, timedelta(hours=25))
    assert _purge(server) >= 1
    assert len(_idempotency_rows(db, young_id)) == 1
    assert _idempotency_rows(db, old_id) == []
    # Within 24 hours a retry is still answered with the original user.
    assert users.CreateUser(_create_request(young_email, password, young_id)) == young
    # A purged request id is forgotten: the retry is a new create, refused as a duplicate ...
    details = details_of(
        _expect_error(lambda: users.CreateUser(_create_request(old_email, password, old_id)))
    )
    assert (details.code, details.reason) == (ALREADY_EXISTS, "EMAIL_TAKEN")
    # ... and with another payload it creates a new user instead of REQUEST_ID_REUSED.
    fresh_email = unique_email("idem-fresh")
    fresh = users.CreateUser(_create_request(fresh_email, password, old_id)).user
    assert fresh.id != old.user.id
    assert len(users_with_email(db, fresh_email)) == 1


def test_an_expired_request_id_is_a_new_request_before_the_purge_runs(
    users: UserServiceStub, db: Engine
) -> None:
    request_id, password = str(uuid.uuid4()), new_password()
    first = users.CreateUser(_create_request(unique_email("idem-exp"), password, request_id))
    _age_key(db, request_id, timedelta(hours=25))
    fresh_email = unique_email("idem-exp-fresh")
    fresh = users.CreateUser(_create_request(fresh_email, password, request_id)).user
    assert fresh.id != first.user.id


# --- uniqueness under concurrent calls ---------------------------------------------------------


def _variants(email: str, count: int) -> list[str]:
    """Spellings of `email` that normalise to it: case, surrounding space, full-width forms."""
    rng = random.Random(email)
    local, domain = email.split("@")
    variants = [email]
    while len(variants) < count:
        n = len(variants)
        cased = "".join(c.upper() if rng.random() < 0.5 else c for c in local)
        dom = domain.upper() if n % 2 else domain
        if n % 5 == 0:
            dom = dom.replace("example", "ｅｘａｍｐｌｅ")  # full-width: NFKC folds it
        variant = f"{cased}@{dom}"
        if n % 3 == 0:
            variant = f"  {variant}\t"
        variants.append(variant)
    assert {normalize_email(v) for v in variants} == {email}
    return variants


def test_the_database_itself_refuses_a_second_row_with_one_email(db: Engine) -> None:
    email = unique_email("unique-index")
    now = datetime.now(UTC)
    row = {
        "email": email,
        "name": "Index",
        "password_hash": "!service-account",
        "roles": [],
        "state": "active",
        "create_time": now,
        "update_time": now,
        "version": 1,
        "token_version": 1,
        "failed_login_count": 0,
    }
    with db.begin() as conn:
        conn.execute(insert(users_table), {**row, "id": uuid.uuid4()})
    with pytest.raises(exc.IntegrityError), db.begin() as conn:
        conn.execute(insert(users_table), {**row, "id": uuid.uuid4()})
    assert len(users_with_email(db, email)) == 1


def test_50_concurrent_creates_of_one_email_have_exactly_one_winner(
    users: UserServiceStub, db: Engine
) -> None:
    email = unique_email("race")
    password = new_password()
    outcomes = fire(
        [
            functools.partial(
                users.CreateUser.future,
                pb.CreateUserRequest(email=variant, name=f"Racer {n}", password=password),
            )
            for n, variant in enumerate(_variants(email, 50))
        ]
    )
    assert codes(outcomes) == {OK: 1, ALREADY_EXISTS: 49}
    assert _reasons(outcomes) == {"EMAIL_TAKEN"}
    (winner,) = [o.response.user for o in outcomes if o.code == OK]
    rows = users_with_email(db, email)
    assert [str(r["id"]) for r in rows] == [winner.id]
    assert rows[0]["name"] == winner.name
    assert [e.action for e in all_events(users, winner.id)] == ["user.created"]


def test_email_changes_racing_creates_of_the_same_email_have_exactly_one_winner(
    users: UserServiceStub, db: Engine
) -> None:
    for _round in range(3):
        email = unique_email("race-change")
        movers = [create_user(users)[0] for _ in range(5)]
        spellings = _variants(email, 10)
        updates = [
            functools.partial(
                users.UpdateUser.future,
                pb.UpdateUserRequest(
                    user=user_pb2.User(id=mover.id, email=spellings[i]), update_mask=mask("email")
                ),
            )
            for i, mover in enumerate(movers)
        ]
        creates = [
            functools.partial(
                users.CreateUser.future,
                pb.CreateUserRequest(
                    email=spellings[5 + i], name="Creator", password=new_password()
                ),
            )
            for i in range(5)
        ]
        # Interleaved, so neither kind always starts first.
        calls = [call for pair in zip(updates, creates, strict=True) for call in pair]
        outcomes = fire(calls)
        assert codes(outcomes) == {OK: 1, ALREADY_EXISTS: 9}
        assert _reasons(outcomes) == {"EMAIL_TAKEN"}
        (winner,) = [o.response.user for o in outcomes if o.code == OK]
        assert [str(r["id"]) for r in users_with_email(db, email)] == [winner.id]
        for mover in movers:
            if mover.id != winner.id:
                assert users.GetUser(pb.GetUserRequest(id=mover.id)).user == mover


# --- transaction conflicts: retried, then ABORTED ----------------------------------------------


def _driver_error(orig: Exception) -> exc.OperationalError:
    """What SQLAlchemy raises for a driver error, as the repositories would see it."""
    return exc.OperationalError("UPDATE users ...", None, orig)


def _patch_update(
    monkeypatch: pytest.MonkeyPatch, error: Callable[[], BaseException], times: int | None
) -> list[int]:
    """Make UserRepository.update raise `error()` its first `times` calls (None: always)."""
    calls: list[int] = []
    original = UserRepository.update

    async def flaky(self: UserRepository, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if times is None or len(calls) <= times:
            raise error()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(UserRepository, "update", flaky)
    return calls


CONFLICTS: dict[str, Callable[[], BaseException]] = {
    "serialization-failure-40001": lambda: _driver_error(
        psycopg.errors.SerializationFailure("could not serialize access")
    ),
    "deadlock-40P01": lambda: _driver_error(psycopg.errors.DeadlockDetected("deadlock detected")),
    "sqlite-database-is-locked": lambda: _driver_error(
        sqlite3.OperationalError("database is locked")
    ),
    "retryable-conflict": lambda: RetryableConflict("transaction conflict"),
}


@pytest.mark.parametrize("conflict", list(CONFLICTS))
def test_a_transient_conflict_is_retried_and_the_change_happens_once(
    users: UserServiceStub, db: Engine, monkeypatch: pytest.MonkeyPatch, conflict: str
) -> None:
    user, _ = create_user(users)
    calls = _patch_update(monkeypatch, CONFLICTS[conflict], times=MAX_ATTEMPTS - 1)
    updated = users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="After Conflicts", etag=user.etag),
            update_mask=mask("name"),
        )
    ).user
    monkeypatch.undo()
    assert len(calls) == MAX_ATTEMPTS
    assert updated.name == "After Conflicts"
    row = stored_user(db, user.id)
    assert row is not None
    assert row["version"] == 2  # one write, not one per attempt
    assert [e.action for e in all_events(users, user.id)] == ["user.updated", "user.created"]


@pytest.mark.parametrize("conflict", list(CONFLICTS))
def test_a_conflict_that_persists_is_aborted_and_changes_nothing(
    users: UserServiceStub, db: Engine, monkeypatch: pytest.MonkeyPatch, conflict: str
) -> None:
    user, _ = create_user(users)
    row_before = stored_user(db, user.id)
    calls = _patch_update(monkeypatch, CONFLICTS[conflict], times=None)
    error = _expect_error(lambda: users.DisableUser(pb.DisableUserRequest(id=user.id)))
    monkeypatch.undo()
    details = details_of(error)
    assert details.code == ABORTED
    assert details.reason == "CONCURRENT_MODIFICATION"
    assert len(calls) == MAX_ATTEMPTS  # bounded
    assert stored_user(db, user.id) == row_before
    assert [e.action for e in all_events(users, user.id)] == ["user.created"]


def test_a_create_that_keeps_conflicting_is_aborted_and_creates_nothing(
    users: UserServiceStub, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    async def conflicting_add(self: UserRepository, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise CONFLICTS["serialization-failure-40001"]()

    monkeypatch.setattr(UserRepository, "add", conflicting_add)
    email = unique_email("conflict-create")
    error = _expect_error(lambda: create_user(users, email=email))
    monkeypatch.undo()
    details = details_of(error)
    assert (details.code, details.reason) == (ABORTED, "CONCURRENT_MODIFICATION")
    assert len(calls) == MAX_ATTEMPTS
    assert users_with_email(db, email) == []
    with db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(users_table)).scalar_one() >= 1


def _patch_once(
    monkeypatch: pytest.MonkeyPatch, cls: type, method: str, error: Callable[[], BaseException]
) -> list[int]:
    """Make `cls.method` raise `error()` on its first call only."""
    calls: list[int] = []
    original = getattr(cls, method)

    async def flaky(self: object, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise error()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, flaky)
    return calls


def _status(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return code_of(error)
    return OK


@pytest.mark.parametrize(
    ("rpc", "method"), [("RefreshToken", "mark_used"), ("Logout", "revoke_family")]
)
def test_a_transient_conflict_in_refresh_or_logout_is_retried(
    users: UserServiceStub,
    channel: grpc.Channel,
    monkeypatch: pytest.MonkeyPatch,
    rpc: str,
    method: str,
) -> None:
    user, password = create_user(users)
    tokens = login(channel, user.email, password)
    auth = AuthServiceStub(record_secrets(channel))
    calls = _patch_once(
        monkeypatch, RefreshTokenRepository, method, CONFLICTS["serialization-failure-40001"]
    )
    if rpc == "RefreshToken":
        code = _status(
            lambda: auth.RefreshToken(
                auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token)
            )
        )
    else:
        code = _status(
            lambda: auth.Logout(auth_pb.LogoutRequest(refresh_token=tokens.refresh_token))
        )
    monkeypatch.undo()
    assert code == OK, f"{rpc} after one transient conflict: {code}"
    assert len(calls) == 2
    # Either way the presented refresh token is now spent.
    spent = _status(
        lambda: auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    )
    assert spent == grpc.StatusCode.UNAUTHENTICATED
