"""Look-alike e-mail addresses (Unicode TS #39 confusable skeletons) cannot make a second
account, while genuine internationalised addresses keep working."""

from __future__ import annotations

import tempfile
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from tests.e2e.auth_helpers import PASSWORD
from tests.support import details_of, sync_engine
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.migrate import upgrade

CYRILLIC_O, CYRILLIC_E, CYRILLIC_A = "\u043e", "\u0435", "\u0430"


def _create(users: UserServiceStub, email: str) -> user_pb2.User:
    user: user_pb2.User = users.CreateUser(
        pb.CreateUserRequest(email=email, name="Look Alike", password=PASSWORD)
    ).user
    return user


@pytest.mark.parametrize(
    "twin",
    [
        lambda tag: f"b{CYRILLIC_O}b-{tag}@example.com",  # Cyrillic o in the local part
        lambda tag: f"bob-{tag}@exampl{CYRILLIC_E}.com",  # Cyrillic e in the domain
        lambda tag: f"bob-{tag}@ex{CYRILLIC_A}mple.com",
        lambda tag: f"bob-{tag}@exarnple.com",  # "rn" looks like "m"
    ],
    ids=["cyrillic-o-local", "cyrillic-e-domain", "cyrillic-a-domain", "rn-for-m"],
)
def test_a_look_alike_address_is_already_exists_with_its_own_reason(
    users: UserServiceStub, twin: object
) -> None:
    tag = uuid.uuid4().hex[:8]
    original = _create(users, f"bob-{tag}@example.com")
    lookalike = twin(tag)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as exc:
        _create(users, lookalike)
    details = details_of(exc.value)
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    assert details.reason == "EMAIL_CONFUSABLE"
    assert "looks the same" in details.message
    # Nor can another account take it by an update.
    other = _create(users, f"carol-{tag}@example.com")
    with pytest.raises(grpc.RpcError) as exc:
        users.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=other.id, email=lookalike),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            )
        )
    assert details_of(exc.value).reason == "EMAIL_CONFUSABLE"
    assert users.GetUser(pb.GetUserRequest(id=original.id)).user.email == original.email


def test_the_exact_same_address_is_still_email_taken(users: UserServiceStub) -> None:
    email = f"dup-{uuid.uuid4().hex[:8]}@example.com"
    _create(users, email)
    with pytest.raises(grpc.RpcError) as exc:
        _create(users, email.upper())
    assert details_of(exc.value).reason == "EMAIL_TAKEN"


def test_genuine_non_latin_addresses_are_distinct_accounts(users: UserServiceStub) -> None:
    tag = uuid.uuid4().hex[:6]
    first = _create(
        users, f"\u0438\u0432\u0430\u043d{tag}@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444"
    )
    second = _create(users, f"\u7528\u6237{tag}@\u4f8b\u5b50.\u5e7f\u544a")
    assert first.id != second.id


def test_the_migration_keeps_existing_look_alikes_and_guards_new_ones() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/old.sqlite3"
        upgrade(url, "0004")
        engine = sync_engine(url)
        with engine.begin() as conn:
            for n, email in enumerate(["amy@example.com", f"{CYRILLIC_A}my@example.com"]):
                conn.execute(
                    text(
                        "INSERT INTO users (id, email, name, password_hash, roles, state, "
                        "create_time, update_time, version, token_version, failed_login_count) "
                        "VALUES (:id, :email, 'Amy', '!', '[]', 'active', :t, :t, 1, 1, 0)"
                    ),
                    {"id": uuid.uuid4().hex, "email": email, "t": f"2026-01-0{n + 1} 00:00:00"},
                )
        upgrade(url)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT email, email_skeleton FROM users ORDER BY create_time")
            ).all()
        engine.dispose()
    assert rows[0][1] == "arny@exarnple.corn"
    assert rows[1][1] is None
