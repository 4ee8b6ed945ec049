"""Soft delete, undelete and purge (AIP-164) through real stubs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import (
    PASSWORD,
    Refusal,
    anonymous_refusal,
    bearer,
    code_of,
    create_user,
    failure_of,
    login_pair,
    service_token_for,
    unique_email,
)
from tests.support import ServerThread
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import audit_events
from usersvc.adapters.tables import users as users_table

NOT_FOUND = grpc.StatusCode.NOT_FOUND
DELETED = user_pb2.USER_STATE_DELETED


@pytest.fixture(scope="module")
def generic(channel: grpc.Channel) -> Refusal:
    return anonymous_refusal(channel)


@pytest.fixture(scope="module")
def service_token(server: ServerThread) -> str:
    return service_token_for(server.settings, f"soft-delete-{uuid.uuid4().hex[:8]}")


def delete(users: UserServiceStub, user: user_pb2.User) -> user_pb2.User:
    users.DeleteUser(pb.DeleteUserRequest(id=user.id))
    deleted: user_pb2.User = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert deleted.state == DELETED
    return deleted


def purge_due_now(server: ServerThread, db: Engine, user_id: str) -> int:
    """Move the user's purge time into the past and run the purge job's function once."""
    with db.begin() as conn:
        conn.execute(
            update(users_table)
            .where(users_table.c.id == uuid.UUID(user_id))
            .values(purge_time=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert server.running is not None
    purged: int = server.call(server.running.components.users.purge_deleted_users())
    return purged


# --- what a deleted user can no longer do -------------------------------------------------------


@pytest.mark.one_backend
def test_a_deleted_user_cannot_log_in_refresh_or_use_its_token_until_undeleted(
    users: UserServiceStub, channel: grpc.Channel, generic: Refusal, service_token: str
) -> None:
    user = create_user(users)
    pair = login_pair(channel, user.email)
    own = UserServiceStub(channel)
    auth = AuthServiceStub(channel)
    deleted = delete(users, user)
    assert deleted.HasField("delete_time") and deleted.HasField("purge_time")
    # Its token was revoked with the deletion; login and refresh look like any failure.
    get_self = pb.GetUserRequest(id=user.id)
    assert (
        Refusal.of(failure_of(lambda: own.GetUser(get_self, metadata=bearer(pair.access_token))))
        == generic
    )
    assert Refusal.of(failure_of(lambda: login_pair(channel, user.email))) == generic
    refresh = auth_pb.RefreshTokenRequest(refresh_token=pair.refresh_token)
    assert Refusal.of(failure_of(lambda: auth.RefreshToken(refresh))) == generic
    # Callers other than admins do not see it at all.
    assert code_of(lambda: own.GetUser(get_self, metadata=bearer(service_token))) == NOT_FOUND
    batch = pb.BatchGetUsersRequest(ids=[user.id], allow_missing=True)
    found = own.BatchGetUsers(batch, metadata=bearer(service_token))
    assert (list(found.users), list(found.missing_ids)) == ([], [user.id])
    assert [u.state for u in users.BatchGetUsers(batch).users] == [DELETED]

    restored = users.UndeleteUser(pb.UndeleteUserRequest(id=user.id, etag=deleted.etag)).user
    assert restored.state == user_pb2.USER_STATE_ACTIVE
    assert not restored.HasField("delete_time") and not restored.HasField("purge_time")
    # The old tokens stay dead; a new login works.
    assert (
        Refusal.of(failure_of(lambda: own.GetUser(get_self, metadata=bearer(pair.access_token))))
        == generic
    )
    fresh = login_pair(channel, user.email, PASSWORD)
    assert own.GetUser(get_self, metadata=bearer(fresh.access_token)).user.id == user.id


@pytest.mark.one_backend
def test_undelete_answers_not_found_and_failed_precondition(users: UserServiceStub) -> None:
    user = create_user(users)
    not_deleted = failure_of(lambda: users.UndeleteUser(pb.UndeleteUserRequest(id=user.id)))
    assert (not_deleted.code, not_deleted.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "USER_NOT_DELETED",
    )
    unknown = pb.UndeleteUserRequest(id=str(uuid.uuid4()))
    assert code_of(lambda: users.UndeleteUser(unknown)) == NOT_FOUND
    malformed = failure_of(lambda: users.UndeleteUser(pb.UndeleteUserRequest(id="nope")))
    assert malformed.code == grpc.StatusCode.INVALID_ARGUMENT
    deleted = delete(users, user)
    for change in (
        lambda: users.DisableUser(pb.DisableUserRequest(id=user.id)),
        lambda: users.ChangePassword(
            pb.ChangePasswordRequest(id=user.id, new_password=PASSWORD + "!")
        ),
    ):
        assert code_of(change) == NOT_FOUND
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == deleted


# --- what storage decides: e-mail reservation, listing, purge -----------------------------------


def test_a_deleted_users_email_stays_taken_until_the_purge(
    users: UserServiceStub, server: ServerThread, db: Engine
) -> None:
    user = create_user(users)
    delete(users, user)
    again = pb.CreateUserRequest(email=user.email, name="Second Owner", password=PASSWORD)
    assert code_of(lambda: users.CreateUser(again)) == grpc.StatusCode.ALREADY_EXISTS
    other = create_user(users)
    rename = pb.UpdateUserRequest(
        user=user_pb2.User(id=other.id, email=user.email),
        update_mask=field_mask_pb2.FieldMask(paths=["email"]),
    )
    assert code_of(lambda: users.UpdateUser(rename)) == grpc.StatusCode.ALREADY_EXISTS
    assert purge_due_now(server, db, user.id) >= 1
    assert users.CreateUser(again).user.email == user.email


def test_list_leaves_deleted_users_out_unless_show_deleted(
    users: UserServiceStub, channel: grpc.Channel, service_token: str
) -> None:
    domain = f"{uuid.uuid4().hex[:10]}.example"
    made = [create_user(users, email=f"u{n}@{domain}") for n in range(3)]
    delete(users, made[1])

    def listed(request: pb.ListUsersRequest) -> list[str]:
        return [u.id for u in users.ListUsers(request).users if u.email.endswith(domain)]

    everyone = pb.ListUsersRequest(page_size=100)
    assert made[1].id not in listed(everyone)
    assert {made[0].id, made[2].id} <= set(listed(everyone))
    shown = pb.ListUsersRequest(page_size=100, show_deleted=True)
    assert {u.id for u in made} <= set(listed(shown))
    only = pb.ListUsersRequest(page_size=100, show_deleted=True, filter="state = DELETED")
    assert made[1].id in listed(only)
    assert all(u.state == DELETED for u in users.ListUsers(only).users)
    exact = users.ListUsers(pb.ListUsersRequest(email=made[1].email))
    assert (list(exact.users), exact.total_size) == ([], 0)
    exact = users.ListUsers(pb.ListUsersRequest(email=made[1].email, show_deleted=True))
    assert ([u.id for u in exact.users], exact.total_size) == ([made[1].id], 1)

    refused = failure_of(lambda: users.ListUsers(pb.ListUsersRequest(filter="state = DELETED")))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(refused.violations) == ["filter"]
    stub = UserServiceStub(channel)
    denied = pb.ListUsersRequest(show_deleted=True)
    assert code_of(lambda: stub.ListUsers(denied, metadata=bearer(service_token))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_page_tokens_are_bound_to_show_deleted(users: UserServiceStub) -> None:
    for _ in range(2):
        create_user(users)
    with_deleted = users.ListUsers(pb.ListUsersRequest(page_size=1, show_deleted=True))
    without = users.ListUsers(pb.ListUsersRequest(page_size=1))
    assert with_deleted.next_page_token and without.next_page_token
    for token, show in ((with_deleted.next_page_token, False), (without.next_page_token, True)):
        request = pb.ListUsersRequest(page_size=1, page_token=token, show_deleted=show)
        details = failure_of(lambda r=request: users.ListUsers(r))  # type: ignore[misc]
        assert (details.code, list(details.violations)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            ["page_token"],
        )
    # The same query goes on as before.
    follow = pb.ListUsersRequest(
        page_size=1, page_token=with_deleted.next_page_token, show_deleted=True
    )
    assert len(users.ListUsers(follow).users) == 1


def test_purge_removes_the_row_and_tombstones_the_audit_trail(
    users: UserServiceStub, server: ServerThread, db: Engine
) -> None:
    name = f"Purged {uuid.uuid4().hex[:8]}"
    email = unique_email("purged")
    user = users.CreateUser(pb.CreateUserRequest(email=email, name=name, password=PASSWORD)).user
    users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name=name + " Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    )
    delete(users, user)
    # Not due yet: the purge leaves it alone.
    server.call(server.running.components.users.purge_deleted_users())  # type: ignore[union-attr]
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user.state == DELETED

    assert purge_due_now(server, db, user.id) >= 1
    with db.connect() as conn:
        row = conn.execute(
            select(users_table.c.id).where(users_table.c.id == uuid.UUID(user.id))
        ).first()
        stored = [
            str(r.changes)
            for r in conn.execute(
                select(audit_events).where(audit_events.c.user_id == uuid.UUID(user.id))
            )
        ]
    assert row is None
    assert code_of(lambda: users.GetUser(pb.GetUserRequest(id=user.id))) == NOT_FOUND
    assert code_of(lambda: users.UndeleteUser(pb.UndeleteUserRequest(id=user.id))) == NOT_FOUND
    events = users.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user.id)).events
    assert [e.action for e in events] == [
        "user.purged",
        "user.deleted",
        "user.updated",
        "user.created",
    ]
    assert (events[0].actor, events[0].request_id.startswith("purge-")) == ("system", True)
    created = {c.field: c.new_value.string_value for c in events[-1].changes}
    assert (created["email"], created["name"]) == ("[PURGED]", "[PURGED]")
    renamed = {
        c.field: (c.old_value.string_value, c.new_value.string_value) for c in events[-2].changes
    }
    assert renamed == {"name": ("[PURGED]", "[PURGED]")}
    assert all(email not in text and name not in text for text in stored)
    # Action, actor, time and request id of the earlier events are as they were.
    assert events[-1].actor and events[-1].request_id and events[-1].HasField("create_time")
