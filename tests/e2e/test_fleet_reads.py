"""BatchGetUsers and ListUsers.filter through real stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from tests.support import ErrorDetails, details_of
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import users as users_table

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def failure(call: Callable[[], Any]) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return details_of(exc.value)


def seed(db: Engine, *specs: tuple[str, tuple[str, ...], str, datetime]) -> dict[str, str]:
    """Users (email, roles, state, create_time) written directly; their ids by e-mail."""
    rows = [
        {
            "id": uuid.uuid4(),
            "email": email,
            "name": "Fleet Reader",
            "password_hash": "$argon2id$seeded",
            "roles": list(roles),
            "state": state,
            "create_time": at,
            "update_time": at,
            "version": 1,
        }
        for email, roles, state, at in specs
    ]
    with db.begin() as conn:
        conn.execute(insert(users_table), rows)
    return {str(r["email"]): str(r["id"]) for r in rows}


def create(stub: UserServiceStub) -> user_pb2.User:
    email = f"batch-{uuid.uuid4().hex[:10]}@example.com"
    resp = stub.CreateUser(
        pb.CreateUserRequest(email=email, name="Batch Read", password="correct horse battery")
    )
    user: user_pb2.User = resp.user
    return user


# --- BatchGetUsers ---------------------------------------------------------------------------


def test_batch_get_answers_in_request_order_with_duplicates(users: UserServiceStub) -> None:
    a, b, c = create(users), create(users), create(users)
    resp = users.BatchGetUsers(pb.BatchGetUsersRequest(ids=[c.id, a.id, c.id.upper(), b.id]))
    assert list(resp.users) == [c, a, c, b]
    assert list(resp.missing_ids) == []


def test_batch_get_of_an_unknown_id_is_not_found_naming_it(users: UserServiceStub) -> None:
    known = create(users)
    gone = [str(uuid.uuid4()) for _ in range(12)]
    details = failure(lambda: users.BatchGetUsers(pb.BatchGetUsersRequest(ids=[known.id, *gone])))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.reason == "USER_NOT_FOUND"
    assert all(g in details.message for g in gone[:10])
    assert gone[10] not in details.message and "and 2 more" in details.message
    assert known.id not in details.message


def test_batch_get_with_allow_missing_lists_the_missing(users: UserServiceStub) -> None:
    known = create(users)
    gone = str(uuid.uuid4())
    resp = users.BatchGetUsers(
        pb.BatchGetUsersRequest(ids=[gone, known.id, gone.upper()], allow_missing=True)
    )
    assert list(resp.users) == [known]
    assert list(resp.missing_ids) == [gone]


def test_batch_get_of_1000_ids_works_and_1001_names_the_limit(users: UserServiceStub) -> None:
    known = create(users)
    ids = [known.id] * 1000
    resp = users.BatchGetUsers(pb.BatchGetUsersRequest(ids=ids))
    assert len(resp.users) == 1000 and resp.users[999] == known
    details = failure(lambda: users.BatchGetUsers(pb.BatchGetUsersRequest(ids=[*ids, known.id])))
    assert details.code == INVALID
    assert "1000" in details.violations["ids"]


def test_batch_get_names_every_malformed_entry_and_counts_the_rest(
    users: UserServiceStub,
) -> None:
    known = create(users)
    ids = [known.id, "nope", known.id, f"{known.id} ", *(f"not-an-id-{n}" for n in range(50))]
    details = failure(lambda: users.BatchGetUsers(pb.BatchGetUsersRequest(ids=ids)))
    assert details.code == INVALID
    assert list(details.violations) == [
        "ids[1]",
        "ids[3]",
        *(f"ids[{i}]" for i in range(4, 11)),
        "ids",
    ]
    assert "43 more" in details.violations["ids"]  # 52 malformed, 9 named
    assert "not-an-id" not in details.message + "".join(details.violations.values())


def test_batch_get_of_huge_entries_is_refused_with_a_bounded_answer(
    users: UserServiceStub,
) -> None:
    huge = "x" * 10_000  # 50 of them: half the largest message the server takes
    details = failure(lambda: users.BatchGetUsers(pb.BatchGetUsersRequest(ids=[huge] * 50)))
    assert details.code == INVALID
    assert len(details.violations) <= 11
    assert huge[:100] not in details.message + "".join(details.violations.values())


def test_a_plain_user_batch_gets_only_itself(users: UserServiceStub, channel: grpc.Channel) -> None:
    from tests.e2e.auth_helpers import bearer, create_user, login_pair

    me, other = create_user(users), create_user(users)
    token = bearer(login_pair(channel, me.email).access_token)
    stub = UserServiceStub(channel)
    resp = stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[me.id, me.id]), metadata=token)
    assert [u.id for u in resp.users] == [me.id, me.id]
    denied = failure(
        lambda: stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[me.id, other.id]), metadata=token)
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    empty = failure(lambda: stub.BatchGetUsers(pb.BatchGetUsersRequest(), metadata=token))
    assert empty.code == grpc.StatusCode.PERMISSION_DENIED


# --- ListUsers.filter ------------------------------------------------------------------------


@pytest.fixture
def directory(db: Engine) -> tuple[str, dict[str, str], datetime]:
    """Six users on a day of their own, under a prefix of their own: (prefix, ids, day)."""
    day = datetime(1850, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 40_000)
    prefix = f"fl{uuid.uuid4().hex[:8]}"
    specs = [
        ("ada", ("admin",), "active"),
        ("ada-off", (), "disabled"),
        ("bob", ("service",), "active"),
        ("both", ("admin", "service"), "active"),
        ("a_%", (), "active"),
        ("zed", ("service",), "disabled"),
    ]
    ids = seed(
        db,
        *(
            (f"{prefix}-{name}@example.com", roles, state, day + timedelta(minutes=n))
            for n, (name, roles, state) in enumerate(specs)
        ),
    )
    return prefix, {e.split("@")[0].removeprefix(f"{prefix}-"): i for e, i in ids.items()}, day


def _rfc3339(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("", ["zed", "a_%", "both", "bob", "ada-off", "ada"]),
        ("state = ACTIVE", ["a_%", "both", "bob", "ada"]),
        ("state = USER_STATE_DISABLED", ["zed", "ada-off"]),
        ('roles:"admin"', ["both", "ada"]),
        ("roles:service", ["zed", "both", "bob"]),
        ('email:"{prefix}-ADA*"', ["ada-off", "ada"]),
        ('email:"{prefix}-a_%*"', ["a_%"]),
        ('email = "{prefix}-bob@example.com"', ["bob"]),
        ("create_time > {t2}", ["zed", "a_%", "both"]),
        ("create_time >= {t2}", ["zed", "a_%", "both", "bob"]),
        ('create_time < "{t2}"', ["ada-off", "ada"]),
        ("create_time <= {t2}", ["bob", "ada-off", "ada"]),
        ('state = ACTIVE AND roles:"service" AND create_time > {t2}', ["both"]),
    ],
)
def test_every_filter_term(
    users: UserServiceStub,
    directory: tuple[str, dict[str, str], datetime],
    term: str,
    expected: list[str],
) -> None:
    prefix, ids, day = directory
    scoped = f'email:"{prefix}-*"'
    source = term.format(prefix=prefix, t2=_rfc3339(day + timedelta(minutes=2)))
    resp = users.ListUsers(
        pb.ListUsersRequest(page_size=100, filter=f"{source} AND {scoped}" if source else scoped)
    )
    by_id = {i: name for name, i in ids.items()}
    assert [by_id[u.id] for u in resp.users] == expected
    assert resp.total_size == len(expected)


def test_filtered_pages_follow_each_other_and_tokens_are_bound_to_the_filter(
    users: UserServiceStub, directory: tuple[str, dict[str, str], datetime]
) -> None:
    prefix, ids, _ = directory
    source = f'roles:service AND email:"{prefix}-*"'
    first = users.ListUsers(pb.ListUsersRequest(page_size=2, filter=source))
    assert first.next_page_token and first.total_size == 3
    rest = users.ListUsers(
        pb.ListUsersRequest(page_size=2, filter=source, page_token=first.next_page_token)
    )
    assert rest.next_page_token == ""
    listed = [u.id for u in [*first.users, *rest.users]]
    assert listed == [ids["zed"], ids["both"], ids["bob"]]
    for other in ("", f'roles:admin AND email:"{prefix}-*"', "roles:service"):
        details = failure(
            lambda o=other: users.ListUsers(  # type: ignore[misc]
                pb.ListUsersRequest(page_size=2, filter=o, page_token=first.next_page_token)
            )
        )
        assert details.code == INVALID
        assert "page_token" in details.violations


def test_the_email_field_and_the_filter_both_apply(
    users: UserServiceStub, directory: tuple[str, dict[str, str], datetime]
) -> None:
    prefix, ids, _ = directory
    email = f"{prefix}-bob@example.com"
    both = users.ListUsers(pb.ListUsersRequest(email=email.upper(), filter="roles:service"))
    assert [u.id for u in both.users] == [ids["bob"]]
    neither = users.ListUsers(pb.ListUsersRequest(email=email, filter="roles:admin"))
    assert (list(neither.users), neither.total_size) == ([], 0)


@pytest.mark.parametrize(
    ("source", "position"),
    [
        ("state = ACTIVE OR roles:admin", 16),
        ("(roles:admin)", 1),
        ("NOT roles:admin", 1),
        ("name = ada", 1),
        ("state != ACTIVE", 7),
        ("roles = admin", 7),
        ("create_time = 2026-01-01T00:00:00Z", 13),
        ("state = GONE", 9),
        ("roles:root", 7),
        ('email:"a*b"', 9),
        ('email:"abc', 7),
        ("create_time > 2026-01-01", 15),
        ("state = ACTIVE roles:admin", 16),
        ("state = ACTIVE AND", 19),
    ],
)
def test_a_bad_filter_is_invalid_argument_with_the_position(
    users: UserServiceStub, source: str, position: int
) -> None:
    details = failure(lambda: users.ListUsers(pb.ListUsersRequest(filter=source)))
    assert details.code == INVALID
    assert f"at position {position}" in details.violations["filter"]
    assert len(details.message) + len(details.violations["filter"]) < 400


@pytest.mark.parametrize(
    "source",
    ["state = ACT\x01IVE", 'email:"ada\x00*"', "roles:admin AND " * 70 + "roles:admin"],
)
def test_a_filter_with_control_characters_or_too_long_is_invalid_argument(
    users: UserServiceStub, source: str
) -> None:
    details = failure(lambda: users.ListUsers(pb.ListUsersRequest(filter=source)))
    assert details.code == INVALID
    assert "filter" in details.violations
    assert len(details.message) + len(details.violations["filter"]) < 400
