"""UserService through real stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from tests.e2e.conftest import CapturedLogs
from tests.support import details_of
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import users as users_table

PASSWORD = "correct horse battery staple"


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


def create(
    stub: UserServiceStub,
    email: str | None = None,
    name: str = "Ada Lovelace",
    password: str = PASSWORD,
) -> user_pb2.User:
    resp: pb.CreateUserResponse = stub.CreateUser(
        pb.CreateUserRequest(email=email or unique_email(), name=name, password=password)
    )
    return resp.user


def error(call: object) -> grpc.RpcError:
    assert isinstance(call, grpc.RpcError)
    return call


# --- CreateUser -------------------------------------------------------------------------------


def test_create_returns_the_user_with_normalised_email(users: UserServiceStub) -> None:
    local = uuid.uuid4().hex[:8]
    user = create(users, email=f"  Ada.{local}@Example.COM ", name="  Ada Lovelace  ")
    assert str(uuid.UUID(user.id)) == user.id
    assert user.email == f"ada.{local}@example.com"
    assert user.name == "Ada Lovelace"
    assert user.state == user_pb2.USER_STATE_ACTIVE
    assert list(user.roles) == []
    assert user.etag
    assert user.create_time == user.update_time
    assert abs(user.create_time.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    fetched = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert fetched == user


def test_create_reports_every_bad_field_at_once(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.CreateUser(pb.CreateUserRequest(email="not-an-email", name="A", password="short"))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details.violations) == {"email", "name", "password"}
    assert details.domain == "usersvc"
    assert details.reason == "INVALID_ARGUMENT"
    assert details.request_id


@pytest.mark.parametrize(
    ("email", "name", "password", "bad_field"),
    [
        ("", "Ada", PASSWORD, "email"),
        ("a" * 243 + "@example.com", "Ada", PASSWORD, "email"),  # 255 characters
        ("two@@example.com", "Ada", PASSWORD, "email"),
        ("no-domain@", "Ada", PASSWORD, "email"),
        ("x@example.com", " A ", PASSWORD, "name"),
        ("x@example.com", "n" * 101, PASSWORD, "name"),
        ("x@example.com", "Ada", "1234567", "password"),
        ("x@example.com", "Ada", "p" * 129, "password"),
    ],
)
def test_create_rejects_bad_field(
    users: UserServiceStub, email: str, name: str, password: str, bad_field: str
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.CreateUser(pb.CreateUserRequest(email=email, name=name, password=password))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(details.violations) == [bad_field]


def test_create_accepts_limits_and_any_unicode(users: UserServiceStub) -> None:
    local = uuid.uuid4().hex[:10]
    domain = ".".join(["d" * 60] * 3) + "." + "c" * (254 - 11 - 183)
    email = f"{local}@{domain}"
    assert len(email) == 254
    assert create(users, email=email, password="p" * 128).email == email
    assert create(users, name="n" * 100, password="🔑🔑🔑🔑пароль密码").name == "n" * 100


@pytest.mark.parametrize(
    "variant",
    ["{local}@EXAMPLE.com", " {LOCAL}@example.com ", "{LOCAL}@ＥＸＡＭＰＬＥ.com"],
)
def test_case_and_unicode_variants_of_an_email_collide(
    users: UserServiceStub, variant: str
) -> None:
    local = f"grace-{uuid.uuid4().hex[:8]}"
    create(users, email=f"{local}@example.com")
    with pytest.raises(grpc.RpcError) as exc:
        create(users, email=variant.format(local=local, LOCAL=local.upper()))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    assert details.reason == "EMAIL_TAKEN"


# --- GetUser ----------------------------------------------------------------------------------


def test_get_malformed_id_is_invalid_argument(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.GetUser(pb.GetUserRequest(id="not-a-uuid"))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in details.violations


def test_get_unknown_id_is_not_found(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "USER_NOT_FOUND"


# --- ListUsers --------------------------------------------------------------------------------


def seed(db: Engine, count: int) -> list[str]:
    """Insert users directly, five to a timestamp so that the id tiebreaker matters."""
    base = datetime(2030, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        at = base + timedelta(seconds=i // 5)
        rows.append(
            {
                "id": uuid.uuid4(),
                "email": f"seed-{i}-{uuid.uuid4().hex[:6]}@example.com",
                "name": f"Seed {i}",
                "password_hash": "$argon2id$seeded",
                "roles": [],
                "state": "active",
                "create_time": at,
                "update_time": at,
                "version": 1,
            }
        )
    with db.begin() as conn:
        conn.execute(insert(users_table), rows)
    ordered = sorted(rows, key=lambda r: (r["create_time"], r["id"]), reverse=True)
    return [str(r["id"]) for r in ordered]


@pytest.mark.usefixtures("empty_users")
def test_paging_returns_every_user_once_in_order(users: UserServiceStub, db: Engine) -> None:
    # The admin the suite calls as (created before the seeds, so last) stays in the table.
    with db.connect() as conn:
        admin_id = str(conn.execute(text("SELECT id FROM users")).scalar_one())
    expected = [*seed(db, 250), str(uuid.UUID(admin_id))]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = users.ListUsers(pb.ListUsersRequest(page_size=7, page_token=token))
        pages += 1
        assert len(resp.users) == 7 or not resp.next_page_token
        assert resp.total_size == 251
        seen.extend(u.id for u in resp.users)
        token = resp.next_page_token
        if not token:
            break
    assert seen == expected
    assert pages == 36  # 35 full pages and one of 6


@pytest.mark.usefixtures("empty_users")
def test_page_size_defaults_and_caps(users: UserServiceStub, db: Engine) -> None:
    seed(db, 120)  # and the admin
    assert len(users.ListUsers(pb.ListUsersRequest(page_size=0)).users) == 50
    assert len(users.ListUsers(pb.ListUsersRequest(page_size=1000)).users) == 100
    assert len(users.ListUsers(pb.ListUsersRequest(page_size=3)).users) == 3


def test_negative_page_size_is_invalid_argument(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.ListUsers(pb.ListUsersRequest(page_size=-1))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in details.violations


def _first_token(users: UserServiceStub, db: Engine) -> str:
    seed(db, 3)
    token = users.ListUsers(pb.ListUsersRequest(page_size=1)).next_page_token
    assert token
    return str(token)


@pytest.mark.parametrize("position", [0, 10, 40, -2])
def test_a_token_altered_by_one_byte_is_refused(
    users: UserServiceStub, db: Engine, position: int
) -> None:
    token = _first_token(users, db)
    chars = list(token)
    chars[position] = "A" if chars[position] != "A" else "B"
    with pytest.raises(grpc.RpcError) as exc:
        users.ListUsers(pb.ListUsersRequest(page_size=1, page_token="".join(chars)))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details.violations


@pytest.mark.parametrize("garbage", ["garbage", "eyJ0IjoxfQ==", "💥"])
def test_garbage_token_is_refused(users: UserServiceStub, garbage: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.ListUsers(pb.ListUsersRequest(page_token=garbage))
    assert details_of(error(exc.value)).code == grpc.StatusCode.INVALID_ARGUMENT


def test_token_from_another_query_is_refused(users: UserServiceStub, db: Engine) -> None:
    token = _first_token(users, db)
    with pytest.raises(grpc.RpcError) as exc:
        users.ListUsers(pb.ListUsersRequest(page_token=token, email="someone@example.com"))
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details.violations


def test_email_filter_is_exact_and_normalised(users: UserServiceStub) -> None:
    user = create(users)
    resp = users.ListUsers(pb.ListUsersRequest(email=f"  {user.email.upper()} "))
    assert [u.id for u in resp.users] == [user.id]
    assert resp.total_size == 1
    assert resp.next_page_token == ""
    none = users.ListUsers(pb.ListUsersRequest(email=f"x{user.email}"))
    assert list(none.users) == [] and none.total_size == 0


# --- UpdateUser -------------------------------------------------------------------------------


def update(stub: UserServiceStub, user: user_pb2.User, *paths: str) -> user_pb2.User:
    resp: pb.UpdateUserResponse = stub.UpdateUser(
        pb.UpdateUserRequest(user=user, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))
    )
    return resp.user


def test_update_name_and_email(users: UserServiceStub) -> None:
    user = create(users)
    new_email = unique_email("renamed").upper()
    changed = user_pb2.User(id=user.id, name="  Grace Hopper ", email=new_email)
    updated = update(users, changed, "name", "email")
    assert updated.name == "Grace Hopper"
    assert updated.email == new_email.lower()
    assert updated.create_time == user.create_time
    assert updated.update_time.ToDatetime() > user.update_time.ToDatetime()
    assert updated.etag != user.etag
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == updated


def test_update_writes_only_masked_fields(users: UserServiceStub) -> None:
    user = create(users)
    updated = update(
        users, user_pb2.User(id=user.id, name="Only Name", email="ignored@x.com"), "name"
    )
    assert updated.email == user.email
    assert updated.name == "Only Name"


@pytest.mark.parametrize(
    ("paths", "reason_text"),
    [
        ([], "at least one"),
        (["password"], "unknown"),
        (["etag"], "cannot"),
        (["id"], "cannot"),
        (["create_time"], "cannot"),
        (["state"], "cannot"),
        (["nickname"], "unknown"),
    ],
)
def test_update_mask_errors(users: UserServiceStub, paths: list[str], reason_text: str) -> None:
    user = create(users)
    with pytest.raises(grpc.RpcError) as exc:
        update(users, user_pb2.User(id=user.id, name="New Name"), *paths)
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_text in details.violations["update_mask"]
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == user


def test_update_bad_values_are_invalid_argument(users: UserServiceStub) -> None:
    user = create(users)
    with pytest.raises(grpc.RpcError) as exc:
        update(users, user_pb2.User(id=user.id, name="x", email="nope"), "name", "email")
    details = details_of(error(exc.value))
    assert set(details.violations) == {"user.name", "user.email"}


def test_update_unknown_user_is_not_found(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        update(users, user_pb2.User(id=str(uuid.uuid4()), name="Nobody"), "name")
    assert details_of(error(exc.value)).code == grpc.StatusCode.NOT_FOUND


def test_update_to_a_taken_email_is_already_exists(users: UserServiceStub) -> None:
    first, second = create(users), create(users)
    with pytest.raises(grpc.RpcError) as exc:
        update(users, user_pb2.User(id=second.id, email=first.email.upper()), "email")
    assert details_of(error(exc.value)).code == grpc.StatusCode.ALREADY_EXISTS
    assert users.GetUser(pb.GetUserRequest(id=second.id)).user == second


def test_update_with_stale_etag_is_aborted(users: UserServiceStub) -> None:
    user = create(users)
    fresh = update(users, user_pb2.User(id=user.id, name="First", etag=user.etag), "name")
    with pytest.raises(grpc.RpcError) as exc:
        update(users, user_pb2.User(id=user.id, name="Second", etag=user.etag), "name")
    details = details_of(error(exc.value))
    assert details.code == grpc.StatusCode.ABORTED
    assert details.reason == "ETAG_MISMATCH"
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == fresh


# --- DeleteUser -------------------------------------------------------------------------------


def test_delete_soft_deletes_and_a_second_delete_is_not_found(
    users: UserServiceStub, db: Engine
) -> None:
    user = create(users)
    users.DeleteUser(pb.DeleteUserRequest(id=user.id))
    # Admins still read it (AIP-164), as DELETED with its delete and purge times.
    seen = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert seen.state == user_pb2.USER_STATE_DELETED
    assert seen.purge_time.ToDatetime(UTC) - seen.delete_time.ToDatetime(UTC) == timedelta(days=30)
    assert abs(seen.delete_time.ToDatetime(UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    with pytest.raises(grpc.RpcError) as exc:
        users.DeleteUser(pb.DeleteUserRequest(id=user.id))
    assert details_of(error(exc.value)).code == grpc.StatusCode.NOT_FOUND
    with db.connect() as conn:
        state = conn.execute(
            text("SELECT state FROM users WHERE email = :e"), {"e": user.email}
        ).scalar_one()
    assert state == "deleted"


def test_delete_unknown_is_not_found_and_malformed_is_invalid(users: UserServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        users.DeleteUser(pb.DeleteUserRequest(id=str(uuid.uuid4())))
    assert details_of(error(exc.value)).code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        users.DeleteUser(pb.DeleteUserRequest(id="123"))
    assert details_of(error(exc.value)).code == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_with_stale_etag_is_aborted_and_keeps_the_user(users: UserServiceStub) -> None:
    user = create(users)
    update(users, user_pb2.User(id=user.id, name="Changed"), "name")
    with pytest.raises(grpc.RpcError) as exc:
        users.DeleteUser(pb.DeleteUserRequest(id=user.id, etag=user.etag))
    assert details_of(error(exc.value)).code == grpc.StatusCode.ABORTED
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user.name == "Changed"


# --- Secrets never leave ----------------------------------------------------------------------


def test_password_and_hash_never_appear_in_responses_logs_or_errors(
    users: UserServiceStub, db: Engine, logs: CapturedLogs
) -> None:
    secret = f"Sekret-{uuid.uuid4().hex}"
    user = create(users, password=secret)
    with db.connect() as conn:
        stored_hash = conn.execute(
            text("SELECT password_hash FROM users WHERE email = :e"), {"e": user.email}
        ).scalar_one()
    assert stored_hash.startswith("$argon2id$")
    assert "m=19456,t=2,p=1" in stored_hash
    outputs = [
        user.SerializeToString(),
        users.GetUser(pb.GetUserRequest(id=user.id)).SerializeToString(),
        users.ListUsers(pb.ListUsersRequest(email=user.email)).SerializeToString(),
    ]
    with pytest.raises(grpc.RpcError) as exc:  # a failing create carrying the password
        users.CreateUser(pb.CreateUserRequest(email=user.email, name="Dup", password=secret))
    err = error(exc.value)
    outputs.append(repr(err).encode())
    assert isinstance(err, grpc.Call)
    for _key, value in err.trailing_metadata() or ():
        outputs.append(value if isinstance(value, bytes) else value.encode())
    with pytest.raises(grpc.RpcError):  # and a validation error next to it
        users.CreateUser(pb.CreateUserRequest(email="bad", name="Dup", password=secret + "x" * 200))
    for blob in outputs:
        assert secret.encode() not in blob
        assert stored_hash.encode() not in blob
    assert logs.text, "no log lines were captured"
    assert secret not in logs.text
    assert stored_hash not in logs.text
    assert stored_hash.split("$")[-1] not in logs.text
