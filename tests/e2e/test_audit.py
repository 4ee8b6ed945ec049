"""The audit trail through real stubs, on SQLite and PostgreSQL.

Every change and every login attempt leaves one record, in the transaction of the change;
secrets never appear in it; records outlive their user and are never rewritten;
ListAuditEvents is for admins, newest first, with keyset page tokens.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import func, insert, inspect, select
from sqlalchemy.engine import Engine

from tests.e2e.integrity_helpers import (
    admin_id,
    all_events,
    audit_rows,
    changes_of,
    code_of,
    create_user,
    login,
    mask,
    new_password,
    refresh_token_rows,
    request_id_metadata,
    row_text,
    stored_user,
    stub_as,
    unique_email,
    update,
    users_with_email,
    with_components,
)
from tests.support import ServerThread, details_of
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.audit_repository import AuditRepository
from usersvc.adapters.tables import audit_events, idempotency_keys, outbox
from usersvc.bootstrap import Components
from usersvc.domain.audit import AuditEvent
from usersvc.operator_tasks import AdminResult, create_admin

REDACTED = "[REDACTED]"


@pytest.fixture
def admin(db: Engine) -> str:
    """The id of the admin the `users` stub calls as."""
    return admin_id(db)


def _assert_secret_free(texts: list[str], *secrets: str) -> None:
    for text in texts:
        assert "$argon2" not in text
        for secret in secrets:
            assert secret not in text


def _expect_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


# --- what each use case records ---------------------------------------------------------------


def test_create_is_audited_with_actor_request_id_time_and_a_redacted_password(
    users: UserServiceStub, db: Engine, admin: str
) -> None:
    request_id = f"audit-create-{uuid.uuid4()}"
    email = unique_email("audit-create")
    user, password = create_user(
        users, email=email, name="Audit Create", metadata=request_id_metadata(request_id)
    )
    events = all_events(users, user.id)
    assert [e.action for e in events] == ["user.created"]
    (event,) = events
    assert uuid.UUID(event.id)
    assert event.user_id == user.id
    assert event.actor == admin
    assert event.request_id == request_id
    # The time of the change itself, in UTC.
    assert event.create_time == user.create_time
    assert abs(event.create_time.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    assert changes_of(event) == {
        "email": (None, email),
        "name": (None, "Audit Create"),
        "roles": (None, []),
        "state": (None, "active"),
        "password": (REDACTED, REDACTED),
    }
    (row,) = audit_rows(db, user.id)
    assert (str(row["id"]), row["action"], row["actor"], row["request_id"]) == (
        event.id,
        "user.created",
        admin,
        request_id,
    )
    assert row["create_time"].utcoffset() == timedelta(0)
    stored = stored_user(db, user.id)
    assert stored is not None
    _assert_secret_free(
        [row_text(row), repr(event.SerializeToString())], password, stored["password_hash"]
    )


def test_updates_record_the_old_and_new_value_of_each_changed_field(
    users: UserServiceStub, db: Engine, admin: str
) -> None:
    user, _ = create_user(users, name="Before Name")
    new_email = unique_email("audit-renamed")
    request_id = f"audit-update-{uuid.uuid4()}"
    renamed = update(
        users,
        user_pb2.User(id=user.id, name="After Name", email=new_email.upper(), etag=user.etag),
        "name",
        "email",
        metadata=request_id_metadata(request_id),
    )
    promoted = update(users, user_pb2.User(id=user.id, roles=["service"]), "roles")
    events = all_events(users, user.id)
    assert [e.action for e in events] == ["user.roles_changed", "user.updated", "user.created"]
    roles_event, update_event, _ = events
    assert changes_of(update_event) == {
        "name": ("Before Name", "After Name"),
        "email": (user.email, new_email),
    }
    assert (update_event.actor, update_event.request_id) == (admin, request_id)
    assert update_event.create_time == renamed.update_time
    assert changes_of(roles_event) == {"roles": ([], ["service"])}
    assert roles_event.create_time == promoted.update_time


def test_a_change_by_the_user_itself_names_the_user_as_actor(
    users: UserServiceStub, channel: grpc.Channel
) -> None:
    user, password = create_user(users)
    me = stub_as(channel, user.email, password)
    update(me, user_pb2.User(id=user.id, name="Self Renamed"), "name")
    latest = all_events(users, user.id)[0]
    assert (latest.action, latest.actor) == ("user.updated", user.id)
    assert changes_of(latest) == {"name": ("Integrity Test", "Self Renamed")}


@pytest.mark.parametrize("by", ["admin", "self"])
def test_password_changes_are_audited_without_passwords_or_hashes(
    users: UserServiceStub, channel: grpc.Channel, db: Engine, admin: str, by: str
) -> None:
    user, old_password = create_user(users)
    before = stored_user(db, user.id)
    assert before is not None
    fresh = new_password()
    stub = users if by == "admin" else stub_as(channel, user.email, old_password)
    changed = stub.ChangePassword(
        pb.ChangePasswordRequest(
            id=user.id,
            current_password="" if by == "admin" else old_password,
            new_password=fresh,
            etag=user.etag,
        )
    ).user
    after = stored_user(db, user.id)
    assert after is not None
    assert after["password_hash"] != before["password_hash"]
    event = all_events(users, user.id)[0]
    assert event.action == "user.password_changed"
    assert event.actor == (admin if by == "admin" else user.id)
    assert changes_of(event) == {"password": (REDACTED, REDACTED)}
    assert event.create_time == changed.update_time
    texts = [row_text(r) for r in audit_rows(db, user.id)]
    texts.append(repr(event.SerializeToString()))
    _assert_secret_free(texts, old_password, fresh, before["password_hash"], after["password_hash"])


def test_disable_and_enable_are_audited(users: UserServiceStub, admin: str) -> None:
    user, _ = create_user(users)
    disabled = users.DisableUser(pb.DisableUserRequest(id=user.id)).user
    enabled = users.EnableUser(pb.EnableUserRequest(id=user.id)).user
    enable_event, disable_event, _ = events = all_events(users, user.id)
    assert [e.action for e in events] == ["user.enabled", "user.disabled", "user.created"]
    assert changes_of(disable_event) == {"state": ("active", "disabled")}
    assert changes_of(enable_event) == {"state": ("disabled", "active")}
    assert (disable_event.actor, enable_event.actor) == (admin, admin)
    assert disable_event.create_time == disabled.update_time
    assert enable_event.create_time == enabled.update_time


def test_operator_tooling_is_audited_as_the_system(
    users: UserServiceStub, server: ServerThread
) -> None:
    email = unique_email("audit-operator")
    password = new_password()

    async def make_admin(c: Components) -> AdminResult:
        return await create_admin(c, email=email, name="Operator Admin", password=password)

    result: AdminResult = with_components(server.settings, make_admin)
    events = all_events(users, str(result.user.id))
    assert [(e.action, e.actor) for e in events] == [("user.created", "system")]
    assert changes_of(events[0])["roles"] == (None, ["admin"])


# --- logins ----------------------------------------------------------------------------------


def test_logins_are_audited_without_passwords_or_tokens(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    user, password = create_user(users)
    auth = AuthServiceStub(channel)
    ok_id, bad_id = f"audit-login-{uuid.uuid4()}", f"audit-login-{uuid.uuid4()}"
    tokens = auth.Login(
        auth_pb.LoginRequest(email=f" {user.email.upper()} ", password=password),
        metadata=request_id_metadata(ok_id),
    ).tokens
    wrong = new_password()
    error = _expect_error(
        lambda: auth.Login(
            auth_pb.LoginRequest(email=user.email, password=wrong),
            metadata=request_id_metadata(bad_id),
        )
    )
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    failed, succeeded, _ = events = all_events(users, user.id)
    assert [e.action for e in events] == [
        "auth.login_failed",
        "auth.login_succeeded",
        "user.created",
    ]
    assert (succeeded.user_id, succeeded.actor, succeeded.request_id) == (
        user.id,
        "anonymous",
        ok_id,
    )
    assert changes_of(succeeded) == {"email": (None, user.email)}
    assert (failed.user_id, failed.actor, failed.request_id) == (user.id, "anonymous", bad_id)
    assert changes_of(failed) == {"email": (None, user.email), "outcome": (None, "wrong_password")}
    stored = stored_user(db, user.id)
    assert stored is not None
    texts = [row_text(r) for r in audit_rows(db, user.id)]
    _assert_secret_free(
        texts,
        password,
        wrong,
        stored["password_hash"],
        tokens.access_token,
        tokens.refresh_token,
        hashlib.sha256(tokens.refresh_token.encode()).hexdigest(),
        tokens.access_token.split(".")[2],  # the signature alone
    )


def test_a_failed_login_of_an_unknown_email_is_audited_without_a_user(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    email = unique_email("audit-nobody")
    guess = new_password()
    request_id = f"audit-nobody-{uuid.uuid4()}"
    error = _expect_error(
        lambda: AuthServiceStub(channel).Login(
            auth_pb.LoginRequest(email=email, password=guess),
            metadata=request_id_metadata(request_id),
        )
    )
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    with db.connect() as conn:
        rows = list(
            conn.execute(
                select(audit_events).where(audit_events.c.request_id == request_id)
            ).mappings()
        )
    assert len(rows) == 1
    (row,) = rows
    assert (row["user_id"], row["action"], row["actor"]) == (None, "auth.login_failed", "anonymous")
    assert row["changes"] == {
        "email": {"old": None, "new": email},
        "outcome": {"old": None, "new": "unknown_email"},
    }
    _assert_secret_free([row_text(row)], guess)
    listed = users.ListAuditEvents(pb.ListAuditEventsRequest(page_size=20)).events
    (event,) = [e for e in listed if e.request_id == request_id]
    assert event.user_id == ""


def test_a_login_of_a_disabled_user_is_audited_as_failed(
    users: UserServiceStub, channel: grpc.Channel
) -> None:
    user, password = create_user(users)
    users.DisableUser(pb.DisableUserRequest(id=user.id))
    error = _expect_error(lambda: login(channel, user.email, password))
    assert code_of(error) == grpc.StatusCode.UNAUTHENTICATED
    latest = all_events(users, user.id)[0]
    assert latest.action == "auth.login_failed"
    assert changes_of(latest)["outcome"] == (None, "disabled")


# --- records outlive users and are never rewritten --------------------------------------------


def test_the_audit_table_has_no_foreign_key_to_users(db: Engine) -> None:
    assert inspect(db).get_foreign_keys("audit_events") == []


def test_records_survive_the_deletion_of_their_user(
    users: UserServiceStub, db: Engine, admin: str
) -> None:
    user, _ = create_user(users, name="Doomed User")
    update(users, user_pb2.User(id=user.id, name="Doomed Renamed"), "name")
    before = audit_rows(db, user.id)
    request_id = f"audit-delete-{uuid.uuid4()}"
    users.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=request_id_metadata(request_id))
    stored = stored_user(db, user.id)
    assert stored is not None and stored["state"] == "deleted"
    after = audit_rows(db, user.id)
    assert len(after) == 3
    assert after[:2] == before
    deleted, _, _ = events = all_events(users, user.id)
    assert [e.action for e in events] == ["user.deleted", "user.updated", "user.created"]
    assert (deleted.actor, deleted.request_id) == (admin, request_id)
    assert changes_of(deleted) == {
        "state": ("active", "deleted"),
        "purge_time": (None, stored["purge_time"].isoformat()),
    }


def test_no_call_changes_or_removes_an_earlier_audit_row(
    users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    before = {r["id"]: row_text(r) for r in audit_rows(db)}
    user, password = create_user(users)  # 1
    user = update(users, user_pb2.User(id=user.id, name="Churned Name"), "name")  # 2
    user = update(users, user_pb2.User(id=user.id, roles=["service"]), "roles")  # 3
    login(channel, user.email, password)  # 4
    _expect_error(lambda: login(channel, user.email, new_password()))  # 5
    users.ChangePassword(pb.ChangePasswordRequest(id=user.id, new_password=new_password()))  # 6
    users.DisableUser(pb.DisableUserRequest(id=user.id))  # 7
    users.EnableUser(pb.EnableUserRequest(id=user.id))  # 8
    users.DeleteUser(pb.DeleteUserRequest(id=user.id))  # 9
    after = {r["id"]: row_text(r) for r in audit_rows(db)}
    assert {key: after.get(key) for key in before} == before
    assert len(set(after) - set(before)) == 9


# --- a failed audit write undoes the change ---------------------------------------------------


class InjectedAuditFailure(RuntimeError):
    pass


async def _failing_add(self: AuditRepository, event: AuditEvent) -> None:
    raise InjectedAuditFailure("injected: the audit table cannot be written")


def _break_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server runs in this process, so patching the class reaches every unit of work.
    monkeypatch.setattr(AuditRepository, "add", _failing_add)


def _assert_internal(error: grpc.RpcError) -> None:
    details = details_of(error)
    assert details.code == grpc.StatusCode.INTERNAL
    assert details.reason == "INTERNAL"
    assert "injected" not in details.message


def test_a_create_whose_audit_record_fails_leaves_nothing_behind(
    users: UserServiceStub, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = unique_email("audit-fail-create")
    request_id = str(uuid.uuid4())
    password = new_password()
    _break_audit(monkeypatch)
    error = _expect_error(
        lambda: create_user(users, email=email, password=password, request_id=request_id)
    )
    monkeypatch.undo()
    _assert_internal(error)
    assert users_with_email(db, email) == []
    with db.connect() as conn:
        keys = conn.execute(
            select(func.count())
            .select_from(idempotency_keys)
            .where(idempotency_keys.c.request_id == request_id)
        ).scalar_one()
        payloads = [p for (p,) in conn.execute(select(outbox.c.payload))]
    assert keys == 0
    assert not [p for p in payloads if p.get("email") == email]  # no welcome e-mail queued
    # Once the audit trail works again, the retry is a first attempt and succeeds.
    user, _ = create_user(users, email=email, password=password, request_id=request_id)
    assert [e.action for e in all_events(users, user.id)] == ["user.created"]


def _update_name(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Never Stored"), update_mask=mask("name")
        )
    )


def _update_email(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, email=unique_email("never")), update_mask=mask("email")
        )
    )


def _update_roles(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, roles=["admin"]), update_mask=mask("roles")
        )
    )


def _change_password(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, new_password="never stored passphrase 1")
    )


def _disable(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.DisableUser(pb.DisableUserRequest(id=user.id))


def _enable(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.EnableUser(pb.EnableUserRequest(id=user.id))


def _delete(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.DeleteUser(pb.DeleteUserRequest(id=user.id))


def _unlock(stub: UserServiceStub, user: user_pb2.User) -> Any:
    return stub.UnlockUser(pb.UnlockUserRequest(id=user.id))


def _fail_one_login(channel: grpc.Channel, email: str) -> None:
    """One counted failure, so that UnlockUser has something to clear."""
    with pytest.raises(grpc.RpcError):
        AuthServiceStub(channel).Login(auth_pb.LoginRequest(email=email, password="wrong!!wrong"))


CHANGES: dict[str, Callable[[UserServiceStub, user_pb2.User], Any]] = {
    "UpdateUser(name)": _update_name,
    "UpdateUser(email)": _update_email,
    "UpdateUser(roles)": _update_roles,
    "ChangePassword": _change_password,
    "DisableUser": _disable,
    "EnableUser": _enable,
    "DeleteUser": _delete,
    "UnlockUser": _unlock,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_whose_audit_record_fails_is_rolled_back(
    users: UserServiceStub,
    channel: grpc.Channel,
    db: Engine,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    user, password = create_user(users)
    tokens: auth_pb.TokenPair | None = None
    if change == "EnableUser":
        user = users.DisableUser(pb.DisableUserRequest(id=user.id)).user
    else:
        # A live login, so that a revocation (password, roles, state) would show.
        tokens = login(channel, user.email, password)
        if change == "UnlockUser":
            _fail_one_login(channel, user.email)
        user = users.GetUser(pb.GetUserRequest(id=user.id)).user  # with its last login time
    row_before = stored_user(db, user.id)
    tokens_before = refresh_token_rows(db, user.id)
    audit_before = audit_rows(db, user.id)
    _break_audit(monkeypatch)
    error = _expect_error(lambda: CHANGES[change](users, user))
    monkeypatch.undo()
    _assert_internal(error)
    assert stored_user(db, user.id) == row_before
    assert refresh_token_rows(db, user.id) == tokens_before
    assert audit_rows(db, user.id) == audit_before
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == user
    if tokens is not None:
        # The user's access token was not revoked.
        got = UserServiceStub(channel).GetUser(
            pb.GetUserRequest(id=user.id),
            metadata=(("authorization", f"Bearer {tokens.access_token}"),),
        )
        # As the user sees itself: without the login counters, which are for admins.
        itself = user_pb2.User()
        itself.CopyFrom(user)
        itself.ClearField("failed_login_count")
        itself.ClearField("locked_until")
        assert got.user == itself


def test_a_login_whose_audit_record_fails_issues_nothing_and_counts_nothing(
    users: UserServiceStub, channel: grpc.Channel, db: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    user, password = create_user(users)
    _expect_error(lambda: login(channel, user.email, new_password()))
    row_before = stored_user(db, user.id)
    assert row_before is not None
    assert row_before["failed_login_count"] == 1
    audit_before = audit_rows(db, user.id)
    auth = AuthServiceStub(channel)
    wrong = new_password()
    _break_audit(monkeypatch)
    succeeded = _expect_error(
        lambda: auth.Login(auth_pb.LoginRequest(email=user.email, password=password))
    )
    failed = _expect_error(
        lambda: auth.Login(auth_pb.LoginRequest(email=user.email, password=wrong))
    )
    monkeypatch.undo()
    _assert_internal(succeeded)
    _assert_internal(failed)
    # Neither the reset of the counter nor a new failure, and no refresh token, was kept.
    assert stored_user(db, user.id) == row_before
    assert refresh_token_rows(db, user.id) == []
    assert audit_rows(db, user.id) == audit_before


# --- ListAuditEvents ---------------------------------------------------------------------------


def test_list_audit_events_is_for_admins_only(
    users: UserServiceStub, channel: grpc.Channel
) -> None:
    member, member_password = create_user(users)
    service, service_password = create_user(users)
    update(users, user_pb2.User(id=service.id, roles=["service"]), "roles")
    callers = {
        "member": stub_as(channel, member.email, member_password),
        "service": stub_as(channel, service.email, service_password),
    }
    for name, stub in callers.items():
        for request in (
            pb.ListAuditEventsRequest(),
            pb.ListAuditEventsRequest(user_id=member.id if name == "member" else service.id),
        ):
            error = _expect_error(functools.partial(stub.ListAuditEvents, request))
            details = details_of(error)
            assert details.code == grpc.StatusCode.PERMISSION_DENIED, name
    anonymous = _expect_error(
        lambda: UserServiceStub(channel).ListAuditEvents(pb.ListAuditEventsRequest())
    )
    assert code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED


def test_list_audit_events_of_a_user_pages_newest_first(users: UserServiceStub, db: Engine) -> None:
    user, _ = create_user(users)
    for n in range(7):
        update(users, user_pb2.User(id=user.id, name=f"Pager {n}"), "name")
    expected = [str(r["id"]) for r in reversed(audit_rows(db, user.id))]
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        response = users.ListAuditEvents(
            pb.ListAuditEventsRequest(user_id=user.id, page_size=3, page_token=token)
        )
        sizes.append(len(response.events))
        seen.extend(e.id for e in response.events)
        token = response.next_page_token
        if not token:
            break
        assert len(sizes) < 10, "paging does not end"
    assert sizes == [3, 3, 2]
    assert seen == expected
    events = all_events(users, user.id)
    assert [changes_of(e)["name"][1] for e in events[:-1]] == [
        f"Pager {n}" for n in range(6, -1, -1)
    ]
    assert events[-1].action == "user.created"


def test_list_audit_events_page_size_defaults_to_50_caps_at_100_and_breaks_ties_by_id(
    users: UserServiceStub, db: Engine
) -> None:
    subject = uuid.uuid4()  # events may be about a user that no longer exists
    base = datetime(2000, 1, 1, tzinfo=UTC)  # old: never the newest events of the table
    rows = [
        {
            "id": uuid.uuid4(),
            "user_id": subject,
            "action": "user.updated",
            "changes": {"name": {"old": f"Seed {i}", "new": f"Seed {i + 1}"}},
            "actor": "system",
            "request_id": f"seed-{i}",
            "create_time": base + timedelta(seconds=i // 4),  # four to a time
        }
        for i in range(120)
    ]
    with db.begin() as conn:
        conn.execute(insert(audit_events), rows)
    request = pb.ListAuditEventsRequest(user_id=str(subject))
    default = users.ListAuditEvents(request)
    assert len(default.events) == 50
    assert default.next_page_token
    request.page_size = 1000
    assert len(users.ListAuditEvents(request).events) == 100
    listed = [e.id for e in all_events(users, str(subject), page_size=7)]
    expected = sorted(rows, key=lambda r: (r["create_time"], r["id"]), reverse=True)
    assert listed == [str(r["id"]) for r in expected]


def test_unfiltered_listing_is_newest_first(users: UserServiceStub) -> None:
    user, _ = create_user(users)
    page = users.ListAuditEvents(pb.ListAuditEventsRequest(page_size=10)).events
    assert page[0].user_id == user.id
    assert page[0].action == "user.created"
    keys = [(e.create_time.ToDatetime(), e.id) for e in page]
    assert keys == sorted(keys, reverse=True)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListAuditEventsRequest(page_size=-1), "page_size"),
        (pb.ListAuditEventsRequest(user_id="not-a-uuid"), "user_id"),
        (pb.ListAuditEventsRequest(page_token="garbage"), "page_token"),
    ],
    ids=["negative-page-size", "malformed-user-id", "garbage-token"],
)
def test_list_audit_events_refuses_bad_arguments(
    users: UserServiceStub, request_: pb.ListAuditEventsRequest, field: str
) -> None:
    details = details_of(_expect_error(lambda: users.ListAuditEvents(request_)))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.violations) == [field]


def test_a_page_token_works_only_for_its_own_query_and_unaltered(
    users: UserServiceStub,
) -> None:
    a, _ = create_user(users)
    update(users, user_pb2.User(id=a.id, name="Second Event"), "name")
    b, _ = create_user(users)
    token = users.ListAuditEvents(
        pb.ListAuditEventsRequest(user_id=a.id, page_size=1)
    ).next_page_token
    assert token
    chars = list(token)
    chars[len(chars) // 2] = "A" if chars[len(chars) // 2] != "A" else "B"
    for request in (
        pb.ListAuditEventsRequest(user_id=b.id, page_size=1, page_token=token),
        pb.ListAuditEventsRequest(page_size=1, page_token=token),
        pb.ListAuditEventsRequest(user_id=a.id, page_size=1, page_token="".join(chars)),
    ):
        details = details_of(_expect_error(functools.partial(users.ListAuditEvents, request)))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(details.violations) == ["page_token"]
    # Control: the token does work for its own query.
    rest = users.ListAuditEvents(
        pb.ListAuditEventsRequest(user_id=a.id, page_size=1, page_token=token)
    )
    assert [e.action for e in rest.events] == ["user.created"]


def test_events_of_a_user_that_never_existed_are_an_empty_last_page(
    users: UserServiceStub,
) -> None:
    response = users.ListAuditEvents(pb.ListAuditEventsRequest(user_id=str(uuid.uuid4())))
    assert list(response.events) == []
    assert response.next_page_token == ""
