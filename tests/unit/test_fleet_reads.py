"""BatchGetUsers and ListUsers.filter in the service layer, on the fakes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest

from tests.unit.conftest import START, UserServiceFactory
from tests.unit.fakes import FakePasswordHasher, FakeUnitOfWorkFactory
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import PermissionDenied, UsersNotFound, ValidationFailed
from usersvc.domain.models import User, UserState, UserView
from usersvc.services.users import (
    BATCH_GET_MAX,
    REPORTED_IDS_MAX,
    REPORTED_MALFORMED_MAX,
    UserService,
)

ADMIN = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"})))
SERVICE = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"})))


@pytest.fixture
def service(make_user_service: UserServiceFactory) -> UserService:
    return make_user_service()


def _store(uow: FakeUnitOfWorkFactory, n: int, **fields: Any) -> User:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email": f"user{n}@example.com",
        "name": f"User {n}",
        "password_hash": FakePasswordHasher.hash_of("some password 1"),
        "roles": (),
        "state": UserState.ACTIVE,
        "create_time": START + timedelta(seconds=n),
        "update_time": START,
        "version": 1,
        **fields,
    }
    user = User(**values)
    uow.store[user.id] = user
    return user


# --- BatchGetUsers ---------------------------------------------------------------------------


async def test_batch_get_keeps_request_order_and_duplicates_in_one_read(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    a, b, c = (_store(uow, n) for n in range(3))
    ids = [str(c.id), str(a.id), str(c.id).upper(), str(b.id)]
    result = await service.batch_get_users(ctx=SERVICE, user_ids=ids)
    assert [u.id for u in result.users] == [c.id, a.id, c.id, b.id]
    assert all(isinstance(u, UserView) for u in result.users)  # never the stored hash
    assert result.missing_ids == []
    assert len(uow.opened) == 1
    assert not uow.last.write


async def test_batch_get_of_unknown_ids_is_not_found_naming_them(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    known = _store(uow, 0)
    missing = [uuid.uuid4() for _ in range(REPORTED_IDS_MAX + 3)]
    with pytest.raises(UsersNotFound) as err:
        await service.batch_get_users(
            ctx=ADMIN, user_ids=[str(known.id), *(str(m) for m in missing)]
        )
    message = err.value.message
    assert all(str(m) in message for m in missing[:REPORTED_IDS_MAX])
    assert str(missing[REPORTED_IDS_MAX]) not in message
    assert message.endswith("and 3 more")
    assert str(known.id) not in message


async def test_batch_get_with_allow_missing_leaves_them_out_and_lists_them_once(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    a = _store(uow, 0)
    gone, also_gone = uuid.uuid4(), uuid.uuid4()
    ids = [str(gone), str(a.id), str(also_gone), str(gone), str(a.id)]
    result = await service.batch_get_users(ctx=ADMIN, user_ids=ids, allow_missing=True)
    assert [u.id for u in result.users] == [a.id, a.id]
    assert result.missing_ids == [gone, also_gone]


async def test_batch_get_refuses_more_than_the_limit_naming_it(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    ids = [str(uuid.uuid4())] * (BATCH_GET_MAX + 1)
    with pytest.raises(ValidationFailed) as err:
        await service.batch_get_users(ctx=ADMIN, user_ids=ids)
    [violation] = err.value.violations
    assert (violation.field, violation.reason) == ("ids", "TOO_MANY")
    assert str(BATCH_GET_MAX) in violation.description
    assert uow.opened == []
    ok = await service.batch_get_users(ctx=ADMIN, user_ids=ids[:BATCH_GET_MAX], allow_missing=True)
    assert len(ok.missing_ids) == 1


async def test_batch_get_names_each_malformed_id_and_counts_the_rest(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    good = str(_store(uow, 0).id)
    ids = [good, "nope", good, *["x" * 10_000] * (REPORTED_MALFORMED_MAX + 4)]
    with pytest.raises(ValidationFailed) as err:
        await service.batch_get_users(ctx=ADMIN, user_ids=ids)
    fields = [v.field for v in err.value.violations]
    named = [1, *range(3, 3 + REPORTED_MALFORMED_MAX - 1)]
    assert fields == [f"ids[{i}]" for i in named] + ["ids"]
    assert "5 more malformed ids" in err.value.violations[-1].description
    # Nothing of the caller's values is echoed: the answer stays small.
    assert all(len(v.description) < 100 for v in err.value.violations)
    assert len(err.value.violations) <= 10
    assert uow.opened == []


async def test_a_plain_user_may_batch_get_only_itself(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    me, other = _store(uow, 0), _store(uow, 1)
    ctx = RequestContext(Principal(user_id=me.id, roles=frozenset()))
    result = await service.batch_get_users(ctx=ctx, user_ids=[str(me.id), str(me.id)])
    assert [u.id for u in result.users] == [me.id, me.id]
    with pytest.raises(PermissionDenied):
        await service.batch_get_users(ctx=ctx, user_ids=[str(me.id), str(other.id)])


async def test_an_empty_batch_is_an_empty_answer(service: UserService) -> None:
    result = await service.batch_get_users(ctx=ADMIN, user_ids=[])
    assert (list(result.users), list(result.missing_ids)) == ([], [])


# --- ListUsers.filter ------------------------------------------------------------------------


async def test_list_filter_selects_counts_and_pages(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    made = [
        _store(
            uow,
            n,
            roles=("service",) if n % 2 else (),
            state=UserState.DISABLED if n % 3 == 0 else UserState.ACTIVE,
            email=f"{'svc' if n % 2 else 'ada'}-{n}@example.com",
        )
        for n in range(12)
    ]
    source = 'roles:"service" AND state = ACTIVE AND email:"SVC-*"'
    expected = sorted(
        (u for u in made if u.roles and u.state is UserState.ACTIVE),
        key=lambda u: (u.create_time, u.id),
        reverse=True,
    )
    first = await service.list_users(page_size=2, page_token="", email="", filter=source)
    assert first.total_size == len(expected) == 4
    second = await service.list_users(
        page_size=2, page_token=first.next_page_token, email="", filter=source
    )
    assert second.next_page_token == ""
    assert [u.id for u in [*first.users, *second.users]] == [u.id for u in expected]


async def test_list_filter_and_the_email_field_combine(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = _store(uow, 0, email="ada@example.com")
    same = await service.list_users(
        page_size=5, page_token="", email="ADA@example.com", filter='email:"ada*"'
    )
    assert [u.id for u in same.users] == [user.id]
    other = await service.list_users(
        page_size=5, page_token="", email="ada@example.com", filter="email = bob@example.com"
    )
    assert (list(other.users), other.total_size) == ([], 0)


async def test_a_bad_filter_is_a_validation_error_with_the_position(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(page_size=-1, page_token="", email="", filter="state = ON")
    got = {v.field: v for v in err.value.violations}
    assert set(got) == {"filter", "page_size"}
    assert got["filter"].reason == "INVALID_FILTER"
    assert "position 9" in got["filter"].description
    assert uow.opened == []


async def test_page_tokens_are_bound_to_the_filter(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    for n in range(4):
        _store(uow, n, roles=("admin",))
    first = await service.list_users(page_size=1, page_token="", email="", filter="roles:admin")
    # The same query spelt differently is the same query.
    again = await service.list_users(
        page_size=1, page_token=first.next_page_token, email="", filter='roles : "admin"'
    )
    assert again.users
    for other in ("", "roles:service", "roles:admin AND state = ACTIVE"):
        with pytest.raises(ValidationFailed) as err:
            await service.list_users(
                page_size=1, page_token=first.next_page_token, email="", filter=other
            )
        assert [v.field for v in err.value.violations] == ["page_token"]


async def test_an_unfiltered_token_keeps_working_across_the_filter_field(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    for n in range(3):
        _store(uow, n)
    first = await service.list_users(page_size=1, page_token="", email="")
    # A blank filter is no filter: tokens of plain lists stay valid.
    nxt = await service.list_users(
        page_size=1, page_token=first.next_page_token, email="", filter="  "
    )
    assert nxt.users and nxt.users[0].id != first.users[0].id
