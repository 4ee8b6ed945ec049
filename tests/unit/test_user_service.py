"""UserService on in-memory fakes: business rules, errors and transaction use."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from tests.unit.conftest import START, UserServiceFactory
from tests.unit.fakes import (
    FakeClock,
    FakePasswordHasher,
    FakeUnitOfWork,
    FakeUnitOfWorkFactory,
    list_order_key,
)
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import (
    EmailTaken,
    EtagMismatch,
    FailedPrecondition,
    PermissionDenied,
    UserNotFound,
    UsersNotFound,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_USER_CREATED
from usersvc.domain.models import User, UserState, UserView
from usersvc.services.users import (
    ESTIMATE_SECONDS,
    EXACT_COUNT_BELOW,
    ListUsersResult,
    UserService,
)

# Callers: the service leaves who-may-touch-whom to the access layer, except for roles.
MEMBER = Principal(user_id=uuid.uuid4(), roles=frozenset())
ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))
PASSWORD = "correct horse battery staple"


async def _create(service: UserService, email: str, name: str = "Some One") -> UserView:
    return await service.create_user(
        ctx=RequestContext(ADMIN), email=email, name=name, password=PASSWORD
    )


async def _update(
    service: UserService,
    actor: Principal,
    *,
    user_id: str,
    paths: list[str],
    email: str = "",
    name: str = "",
    roles: list[str] | tuple[str, ...] = (),
    etag: str = "",
) -> UserView:
    """UpdateUser as `actor`; fields the mask does not name may be left out."""
    return await service.update_user(
        ctx=RequestContext(actor),
        user_id=user_id,
        paths=paths,
        email=email,
        name=name,
        roles=roles,
        etag=etag,
    )


def _stored_user(n: int, create_time: datetime) -> User:
    return User(
        id=uuid.uuid4(),
        email=f"user{n}@example.com",
        name=f"User {n}",
        password_hash=FakePasswordHasher.hash_of(PASSWORD),
        roles=(),
        state=UserState.ACTIVE,
        create_time=create_time,
        update_time=create_time,
        version=1,
    )


def _violations(err: pytest.ExceptionInfo[ValidationFailed]) -> list[tuple[str, str]]:
    return [(v.field, v.reason) for v in err.value.violations]


def _assert_committed_once(uow: FakeUnitOfWork) -> None:
    assert uow.write
    assert uow.exited
    assert uow.commits == 1


def _assert_rolled_back(uow: FakeUnitOfWork) -> None:
    assert uow.exited
    assert uow.commits == 0
    assert uow.rolled_back


# --- create ----------------------------------------------------------------------------------


async def test_create_normalises_and_stores_the_user(
    service: UserService, uow: FakeUnitOfWorkFactory, hasher: FakePasswordHasher
) -> None:
    user = await service.create_user(
        ctx=RequestContext(ADMIN),
        email="  Alice@Example.COM ",
        name="  Alice Liddell  ",
        password=PASSWORD,
    )
    assert user.email == "alice@example.com"
    assert user.name == "Alice Liddell"
    assert user.roles == ()
    assert user.state is UserState.ACTIVE
    assert user.create_time == user.update_time == START
    assert (user.version, user.etag) == (1, '"1"')
    assert uow.store[user.id].password_hash == hasher.hash_of(PASSWORD)
    assert uow.views == {user.id: user}
    assert len(uow.opened) == 1
    _assert_committed_once(uow.last)


async def test_create_writes_one_welcome_message_in_the_same_transaction(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await service.create_user(
        ctx=RequestContext(ADMIN, request_id="req-123"),
        email="welcome@example.com",
        name="Wendy",
        password=PASSWORD,
    )
    assert len(uow.outbox) == 1
    message = uow.outbox[0]
    assert (message.topic, message.aggregate_id) == (TOPIC_USER_CREATED, user.id)
    assert message.payload == {"user_id": str(user.id), "email": user.email, "name": "Wendy"}
    assert message.request_id == "req-123"
    assert message.create_time == START
    assert PASSWORD not in repr(message)
    assert uow.store[user.id].password_hash not in repr(message)


async def test_create_ids_are_distinct(service: UserService) -> None:
    first = await _create(service, "a@example.com")
    second = await _create(service, "b@example.com")
    assert first.id != second.id


async def test_create_hashes_the_password_as_given(
    service: UserService, uow: FakeUnitOfWorkFactory, hasher: FakePasswordHasher
) -> None:
    password = " 🔑" * 64  # 128 code points with spaces at both ends: no trimming, no truncation
    user = await service.create_user(
        ctx=RequestContext(ADMIN), email="k@example.com", name="Key", password=password
    )
    assert hasher.hashed == [password]
    assert uow.store[user.id].password_hash == hasher.hash_of(password)


async def test_create_reports_every_violation_at_once(
    service: UserService, uow: FakeUnitOfWorkFactory, hasher: FakePasswordHasher
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.create_user(
            ctx=RequestContext(ADMIN), email="not-an-email", name=" A ", password="short"
        )
    assert _violations(err) == [
        ("email", "INVALID_FORMAT"),
        ("name", "OUT_OF_RANGE"),
        ("password", "OUT_OF_RANGE"),
    ]
    assert "short" not in str(err.value)
    assert hasher.hashed == []  # no hashing work for a request that is refused anyway
    assert uow.opened == []
    assert uow.views == {}


async def test_create_refuses_a_common_password_in_any_case(
    uow: FakeUnitOfWorkFactory, make_user_service: UserServiceFactory
) -> None:
    service = make_user_service(common_passwords=frozenset({"password123"}))
    with pytest.raises(ValidationFailed) as err:
        await service.create_user(
            ctx=RequestContext(ADMIN), email="a@example.com", name="Al", password="PassWord123"
        )
    assert _violations(err) == [("password", "COMMON_PASSWORD")]
    assert uow.views == {}


async def test_create_refuses_a_password_of_129_code_points(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.create_user(
            ctx=RequestContext(ADMIN), email="a@example.com", name="Al", password="🔑" * 129
        )
    assert _violations(err) == [("password", "OUT_OF_RANGE")]
    assert uow.views == {}


async def test_create_with_a_case_variant_of_a_taken_email_fails_and_rolls_back(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    first = await _create(service, "bob@example.com", "Bob")
    with pytest.raises(EmailTaken):
        await _create(service, "  BOB@Example.com ", "Other Bob")
    assert uow.views == {first.id: first}
    assert [m.aggregate_id for m in uow.outbox] == [first.id]  # no welcome for the refused one
    _assert_rolled_back(uow.last)


async def test_create_with_a_fullwidth_variant_of_a_taken_email_fails(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    await _create(service, "a@x.com")
    with pytest.raises(EmailTaken):
        await _create(service, "Ａ@ｘ.com")
    assert len(uow.store) == 1


# --- get -------------------------------------------------------------------------------------


async def test_get_returns_the_stored_user_in_a_read_only_unit_of_work(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "carol@example.com")
    assert await service.get_user(str(created.id)) == created
    assert not uow.last.write
    assert uow.last.commits == 0


@pytest.mark.parametrize("bad_id", ["", "nope", "1234", "12345678-1234-5678-1234-56781234567"])
async def test_get_with_a_malformed_id_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory, bad_id: str
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.get_user(bad_id)
    assert _violations(err) == [("id", "INVALID_FORMAT")]
    assert uow.opened == []


async def test_get_of_an_unknown_id_is_user_not_found(service: UserService) -> None:
    await _create(service, "dave@example.com")
    with pytest.raises(UserNotFound):
        await service.get_user(str(uuid.uuid4()))


# --- list ------------------------------------------------------------------------------------


async def test_list_with_a_negative_page_size_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(page_size=-1, page_token="", email="")
    assert _violations(err) == [("page_size", "OUT_OF_RANGE")]
    assert uow.opened == []


async def test_list_reports_page_size_and_page_token_together(service: UserService) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(page_size=-5, page_token="garbage", email="")
    assert [field for field, _ in _violations(err)] == ["page_size", "page_token"]


async def test_list_with_a_bad_page_token_is_a_validation_error(service: UserService) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(page_size=10, page_token="not-a-token", email="")
    assert _violations(err) == [("page_token", "INVALID_PAGE_TOKEN")]


async def test_list_with_a_too_long_email_filter_is_a_validation_error(
    service: UserService,
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(page_size=10, page_token="", email="a" * 250 + "@x.com")
    assert _violations(err) == [("email", "TOO_LONG")]


@pytest.mark.parametrize(
    ("page_size", "expected"), [(0, 50), (1, 1), (99, 99), (100, 100), (101, 100), (500, 100)]
)
async def test_list_page_size_defaults_to_50_and_is_capped_at_100(
    service: UserService, uow: FakeUnitOfWorkFactory, page_size: int, expected: int
) -> None:
    for n in range(120):
        user = _stored_user(n, START + timedelta(seconds=n))
        uow.store[user.id] = user
    result = await service.list_users(page_size=page_size, page_token="", email="")
    assert len(result.users) == expected
    assert result.next_page_token != ""
    assert result.total_size == 120
    assert not uow.last.write


async def test_a_large_total_is_reused_for_a_few_seconds_but_filtered_counts_are_exact(
    make_user_service: UserServiceFactory, uow: FakeUnitOfWorkFactory
) -> None:
    now = [100.0]
    service = make_user_service(monotonic=lambda: now[0])
    users = [_stored_user(n, START + timedelta(seconds=n)) for n in range(EXACT_COUNT_BELOW)]
    uow.store.update((u.id, u) for u in users)

    async def total(email: str = "", filter: str = "") -> int:
        result = await service.list_users(page_size=1, page_token="", email=email, filter=filter)
        return result.total_size

    assert await total() == EXACT_COUNT_BELOW
    extra = _stored_user(EXACT_COUNT_BELOW, START - timedelta(days=1))
    uow.store[extra.id] = extra
    # Within the estimate's lifetime the unfiltered total is the one already taken ...
    now[0] += ESTIMATE_SECONDS - 0.5
    assert await total() == EXACT_COUNT_BELOW
    # ... while a filtered count is always exact, and the estimate is taken anew after it.
    assert await total(extra.email) == 1
    assert await total(filter="state = ACTIVE") == EXACT_COUNT_BELOW + 1
    assert await total(filter=f'email = "{extra.email}"') == 1
    now[0] += 1.0
    assert await total() == EXACT_COUNT_BELOW + 1


async def test_a_small_total_is_counted_on_every_page(
    make_user_service: UserServiceFactory, uow: FakeUnitOfWorkFactory
) -> None:
    service = make_user_service(monotonic=lambda: 0.0)
    first = _stored_user(1, START)
    uow.store[first.id] = first
    assert (await service.list_users(page_size=1, page_token="", email="")).total_size == 1
    second = _stored_user(2, START + timedelta(seconds=1))
    uow.store[second.id] = second
    assert (await service.list_users(page_size=1, page_token="", email="")).total_size == 2


async def _all_pages(
    service: UserService, page_size: int, email: str = ""
) -> list[ListUsersResult]:
    pages = [await service.list_users(page_size=page_size, page_token="", email=email)]
    while pages[-1].next_page_token:
        assert len(pages) < 100, "paging does not end"
        pages.append(
            await service.list_users(
                page_size=page_size, page_token=pages[-1].next_page_token, email=email
            )
        )
    return pages


async def test_paging_through_23_users_returns_each_once_in_order(
    service: UserService, clock: FakeClock
) -> None:
    created: list[UserView] = []
    for n in range(23):
        if n % 3 == 0:  # groups of three share a create_time: the id breaks the tie
            clock.advance(timedelta(seconds=1))
        created.append(await _create(service, f"user{n}@example.com"))
    pages = await _all_pages(service, page_size=5)
    assert [len(p.users) for p in pages] == [5, 5, 5, 5, 3]
    assert [p.next_page_token == "" for p in pages] == [False] * 4 + [True]
    assert all(p.total_size == 23 for p in pages)
    listed = [u.id for p in pages for u in p.users]
    expected = [u.id for u in sorted(created, key=list_order_key, reverse=True)]
    assert listed == expected
    assert len(set(listed)) == 23


async def test_list_is_stable_when_a_user_is_created_between_pages(
    service: UserService, clock: FakeClock
) -> None:
    for n in range(6):
        await _create(service, f"user{n}@example.com")
    first = await service.list_users(page_size=3, page_token="", email="")
    clock.advance(timedelta(seconds=1))
    await _create(service, "newcomer@example.com")  # newest: sorts before the first page
    second = await service.list_users(page_size=3, page_token=first.next_page_token, email="")
    seen = [u.email for u in [*first.users, *second.users]]
    assert len(set(seen)) == 6
    assert "newcomer@example.com" not in seen


async def test_list_filters_by_normalised_email(service: UserService) -> None:
    carol = await _create(service, "carol@example.com")
    await _create(service, "dave@example.com")
    result = await service.list_users(page_size=10, page_token="", email="  CAROL@Example.com ")
    assert [u.id for u in result.users] == [carol.id]
    assert result.total_size == 1
    assert result.next_page_token == ""


async def test_list_refuses_a_token_from_another_query(service: UserService) -> None:
    for n in range(3):
        await _create(service, f"user{n}@example.com")
    unfiltered = await service.list_users(page_size=1, page_token="", email="")
    assert unfiltered.next_page_token
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(
            page_size=1, page_token=unfiltered.next_page_token, email="user0@example.com"
        )
    assert _violations(err) == [("page_token", "INVALID_PAGE_TOKEN")]


async def test_list_of_no_users_is_one_empty_last_page(service: UserService) -> None:
    result = await service.list_users(page_size=0, page_token="", email="")
    assert list(result.users) == []
    assert (result.next_page_token, result.total_size) == ("", 0)


# --- update ----------------------------------------------------------------------------------


async def test_update_writes_only_the_masked_field(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    created = await _create(service, "erin@example.com", "Erin")
    later = clock.advance(timedelta(minutes=5))
    updated = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["name"],
        email="ignored: not in the mask",
        name="  Erin Updated ",
        etag="",
    )
    assert updated.name == "Erin Updated"
    assert updated.email == "erin@example.com"
    assert updated.update_time == later > created.update_time
    assert updated.create_time == created.create_time == START
    assert (updated.version, updated.etag) == (2, '"2"')
    assert uow.store[created.id].password_hash == FakePasswordHasher.hash_of(PASSWORD)
    assert uow.store[created.id].view() == updated
    _assert_committed_once(uow.last)


async def test_update_normalises_a_new_email(service: UserService) -> None:
    created = await _create(service, "frank@example.com")
    updated = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["email"],
        email=" Frank@New.Example ",
        name="",
        etag="",
    )
    assert updated.email == "frank@new.example"
    assert updated.name == created.name


async def test_update_with_the_current_etag_succeeds(
    service: UserService, clock: FakeClock
) -> None:
    created = await _create(service, "gina@example.com")
    clock.advance(timedelta(seconds=1))
    first = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["name"],
        email="",
        name="Gina",
        etag=created.etag,
    )
    second = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["name"],
        email="",
        name="Gina B",
        etag=first.etag,
    )
    assert (first.version, second.version) == (2, 3)
    assert second.name == "Gina B"


@pytest.mark.parametrize(
    ("etag", "checked_in_a_transaction"),
    [('"1"', True), ('"3"', True), ('W/"2"', True), ("2", True), ("garbage", True)],
)
async def test_update_with_a_stale_or_foreign_etag_is_etag_mismatch(
    service: UserService, uow: FakeUnitOfWorkFactory, etag: str, checked_in_a_transaction: bool
) -> None:
    created = await _create(service, "hank@example.com", "Hank")
    current = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["name"],
        email="",
        name="Hank Two",
        etag="",
    )
    assert current.etag == '"2"'
    with pytest.raises(EtagMismatch):
        await _update(
            service,
            MEMBER,
            user_id=str(created.id),
            paths=["name"],
            email="",
            name="Lost Update",
            etag=etag,
        )
    assert uow.store[created.id].view() == current
    # Even an etag this server never issues is checked in the transaction, after existence.
    assert len(uow.opened) == (3 if checked_in_a_transaction else 2)
    if checked_in_a_transaction:
        _assert_rolled_back(uow.last)


async def test_update_of_an_unknown_user_is_user_not_found(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    for etag in ("", '"1"'):
        with pytest.raises(UserNotFound):
            await _update(
                service,
                MEMBER,
                user_id=str(uuid.uuid4()),
                paths=["name"],
                email="",
                name="Nobody",
                etag=etag,
            )
        _assert_rolled_back(uow.last)
    assert uow.views == {}


async def test_update_with_an_empty_mask_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "ivy@example.com")
    with pytest.raises(ValidationFailed) as err:
        await _update(
            service,
            MEMBER,
            user_id=str(created.id),
            paths=[],
            email="x@example.com",
            name="Xavier",
            etag="",
        )
    assert _violations(err) == [("update_mask", "REQUIRED")]
    assert uow.store[created.id].view() == created
    assert len(uow.opened) == 1  # only the create's


@pytest.mark.parametrize("path", ["nickname", "password", "password_hash", "version", "Name", ""])
async def test_update_with_an_unknown_path_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory, path: str
) -> None:
    created = await _create(service, "jack@example.com")
    with pytest.raises(ValidationFailed) as err:
        await _update(
            service,
            MEMBER,
            user_id=str(created.id),
            paths=["name", path],
            email="",
            name="Jack",
            etag="",
        )
    assert _violations(err) == [("update_mask", "UNKNOWN_FIELD")]
    assert uow.store[created.id].view() == created


@pytest.mark.parametrize("path", ["id", "state", "create_time", "update_time", "etag"])
async def test_update_of_an_immutable_path_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory, path: str
) -> None:
    created = await _create(service, "kate@example.com")
    with pytest.raises(ValidationFailed) as err:
        await _update(
            service,
            MEMBER,
            user_id=str(created.id),
            paths=[path],
            email="",
            name="",
            etag="",
        )
    assert _violations(err) == [("update_mask", "IMMUTABLE_FIELD")]
    assert uow.store[created.id].view() == created
    assert len(uow.opened) == 1


async def test_update_reports_every_violation_at_once(service: UserService) -> None:
    with pytest.raises(ValidationFailed) as err:
        await _update(
            service,
            MEMBER,
            user_id="not-a-uuid",
            paths=["email", "name", "state"],
            email="bad",
            name="X",
            etag="",
        )
    assert _violations(err) == [
        ("user.id", "INVALID_FORMAT"),
        ("user.email", "INVALID_FORMAT"),
        ("user.name", "OUT_OF_RANGE"),
        ("update_mask", "IMMUTABLE_FIELD"),
    ]


async def test_update_to_a_case_variant_of_another_users_email_is_email_taken(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    await _create(service, "liam@example.com")
    mia = await _create(service, "mia@example.com")
    with pytest.raises(EmailTaken):
        await _update(
            service,
            MEMBER,
            user_id=str(mia.id),
            paths=["email"],
            email="LIAM@example.com",
            name="",
            etag="",
        )
    assert uow.store[mia.id].view() == mia
    _assert_rolled_back(uow.last)


async def test_update_of_roles_by_a_non_admin_is_permission_denied(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "rob@example.com")
    with pytest.raises(PermissionDenied):
        await _update(
            service,
            MEMBER,
            user_id=str(created.id),
            paths=["roles"],
            email="",
            name="",
            roles=["admin"],
            etag="",
        )
    assert uow.store[created.id].view() == created
    assert len(uow.opened) == 1


@pytest.fixture
def revoked(make_user_service: UserServiceFactory) -> tuple[UserService, list[uuid.UUID]]:
    """A service whose token-revocation hook records the users it was called for."""
    calls: list[uuid.UUID] = []
    service = make_user_service(on_tokens_revoked=calls.append)
    return service, calls


async def test_admin_changes_roles_and_the_users_tokens_are_revoked(
    revoked: tuple[UserService, list[uuid.UUID]], uow: FakeUnitOfWorkFactory
) -> None:
    service, calls = revoked
    created = await _create(service, "sam@example.com")
    updated = await _update(
        service,
        ADMIN,
        user_id=str(created.id),
        paths=["roles"],
        email="",
        name="",
        roles=["service", "admin", "admin"],
        etag=created.etag,
    )
    assert updated.roles == ("admin", "service")
    assert updated.token_version == created.token_version + 1
    assert uow.store[created.id].view() == updated
    assert uow.db.refresh_tokens_revoked == [created.id]
    assert calls == [created.id]


async def test_setting_the_same_roles_again_revokes_nothing(
    revoked: tuple[UserService, list[uuid.UUID]], uow: FakeUnitOfWorkFactory
) -> None:
    service, calls = revoked
    created = await _create(service, "tia@example.com")
    updated = await _update(
        service,
        ADMIN,
        user_id=str(created.id),
        paths=["roles"],
        email="",
        name="",
        etag="",
    )
    assert updated.roles == ()
    assert updated.token_version == created.token_version
    assert uow.db.refresh_tokens_revoked == []
    assert calls == []


async def test_an_unknown_role_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "uma@example.com")
    with pytest.raises(ValidationFailed) as err:
        await _update(
            service,
            ADMIN,
            user_id=str(created.id),
            paths=["roles"],
            email="",
            name="",
            roles=["admin", "superuser"],
            etag="",
        )
    assert _violations(err) == [("user.roles", "UNKNOWN_ROLE")]
    assert uow.store[created.id].view() == created


# --- delete ----------------------------------------------------------------------------------


async def test_delete_soft_deletes_the_user_and_hides_it_from_non_admins(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "nina@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    _assert_committed_once(uow.last)
    stored = uow.store[created.id]
    assert stored.state is UserState.DELETED
    assert stored.delete_time == START
    assert stored.purge_time == START + timedelta(days=30)
    assert stored.deleted_from_state is UserState.ACTIVE
    assert stored.token_version == created.token_version + 1
    assert uow.db.refresh_tokens_revoked == [created.id]
    with pytest.raises(UserNotFound):
        await service.get_user(str(created.id), ctx=RequestContext(MEMBER))
    seen = await service.get_user(str(created.id), ctx=RequestContext(ADMIN))
    assert (seen.state, seen.delete_time, seen.purge_time) == (
        UserState.DELETED,
        START,
        START + timedelta(days=30),
    )


async def test_delete_with_the_current_etag_deletes_the_user(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "omar@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id), etag=created.etag)
    assert uow.store[created.id].state is UserState.DELETED


async def test_retention_sets_the_purge_time(
    make_user_service: UserServiceFactory, uow: FakeUnitOfWorkFactory
) -> None:
    service = make_user_service(deleted_user_retention=timedelta(days=7))
    created = await _create(service, "ola@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    assert uow.store[created.id].purge_time == START + timedelta(days=7)


async def test_deleting_a_deleted_user_is_user_not_found(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "otto@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    before = uow.store[created.id]
    with pytest.raises(UserNotFound):
        await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    assert uow.store[created.id] == before


@pytest.mark.parametrize("change", ["update", "disable", "enable", "password"])
async def test_a_deleted_user_cannot_be_changed(
    service: UserService, uow: FakeUnitOfWorkFactory, change: str
) -> None:
    created = await _create(service, "oona@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    before = uow.store[created.id]
    ctx = RequestContext(ADMIN)
    uid = str(created.id)
    calls = {
        "update": lambda: _update(
            service, ADMIN, user_id=uid, paths=["name"], email="", name="New", etag=""
        ),
        "disable": lambda: service.disable_user(ctx=ctx, user_id=uid, etag=""),
        "enable": lambda: service.enable_user(ctx=ctx, user_id=uid, etag=""),
        "password": lambda: service.change_password(
            ctx=ctx, user_id=uid, current_password="", new_password="another long one", etag=""
        ),
    }
    with pytest.raises(UserNotFound):
        await calls[change]()
    assert uow.store[created.id] == before


@pytest.mark.parametrize("disabled_first", [False, True])
async def test_undelete_restores_the_state_before_the_deletion(
    service: UserService, uow: FakeUnitOfWorkFactory, disabled_first: bool
) -> None:
    created = await _create(service, "olga@example.com")
    ctx = RequestContext(ADMIN)
    if disabled_first:
        await service.disable_user(ctx=ctx, user_id=str(created.id), etag="")
    await service.delete_user(ctx=ctx, user_id=str(created.id))
    deleted = uow.store[created.id]
    restored = await service.undelete_user(ctx=ctx, user_id=str(created.id), etag=deleted.etag)
    expected = UserState.DISABLED if disabled_first else UserState.ACTIVE
    assert (restored.state, restored.delete_time, restored.purge_time) == (expected, None, None)
    assert restored.version == deleted.version + 1
    # Tokens revoked by the deletion stay revoked: the token version only moves on.
    assert restored.token_version == deleted.token_version + 1
    assert uow.store[created.id].deleted_from_state is None
    assert (await service.get_user(str(created.id), ctx=RequestContext(MEMBER))).state is expected


async def test_undelete_of_a_user_not_deleted_is_failed_precondition(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "oskar@example.com")
    with pytest.raises(FailedPrecondition) as err:
        await service.undelete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    assert err.value.reason == "USER_NOT_DELETED"
    with pytest.raises(UserNotFound):
        await service.undelete_user(ctx=RequestContext(ADMIN), user_id=str(uuid.uuid4()))
    assert uow.store[created.id].view() == created


async def test_undelete_with_a_stale_etag_is_etag_mismatch(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "ozzy@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    with pytest.raises(EtagMismatch):
        await service.undelete_user(
            ctx=RequestContext(ADMIN), user_id=str(created.id), etag=created.etag
        )
    assert uow.store[created.id].state is UserState.DELETED


async def test_batch_get_reports_deleted_users_missing_except_to_admins(
    service: UserService,
) -> None:
    kept = await _create(service, "pam@example.com")
    gone = await _create(service, "pat@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(gone.id))
    ids = [str(kept.id), str(gone.id)]
    as_service = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"})))
    result = await service.batch_get_users(ctx=as_service, user_ids=ids, allow_missing=True)
    assert ([u.id for u in result.users], result.missing_ids) == ([kept.id], [gone.id])
    with pytest.raises(UsersNotFound):
        await service.batch_get_users(ctx=as_service, user_ids=ids)
    result = await service.batch_get_users(ctx=RequestContext(ADMIN), user_ids=ids)
    assert [u.state for u in result.users] == [UserState.ACTIVE, UserState.DELETED]


async def test_list_leaves_deleted_users_out_unless_show_deleted(
    service: UserService, clock: FakeClock
) -> None:
    kept = await _create(service, "quentin@example.com")
    clock.advance(timedelta(seconds=1))
    gone = await _create(service, "quincy@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(gone.id))
    ctx = RequestContext(ADMIN)
    plain = await service.list_users(page_size=0, page_token="", email="", ctx=ctx)
    assert ([u.id for u in plain.users], plain.total_size) == ([kept.id], 1)
    shown = await service.list_users(
        page_size=0, page_token="", email="", show_deleted=True, ctx=ctx
    )
    assert ([u.id for u in shown.users], shown.total_size) == ([gone.id, kept.id], 2)
    only = await service.list_users(
        page_size=0, page_token="", email="", filter="state = DELETED", show_deleted=True, ctx=ctx
    )
    assert [u.id for u in only.users] == [gone.id]
    with pytest.raises(ValidationFailed) as err:
        await service.list_users(
            page_size=0, page_token="", email="", filter="state = DELETED", ctx=ctx
        )
    assert _violations(err) == [("filter", "SHOW_DELETED_REQUIRED")]
    with pytest.raises(PermissionDenied):
        await service.list_users(
            page_size=0,
            page_token="",
            email="",
            show_deleted=True,
            ctx=RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"}))),
        )


async def test_page_tokens_are_bound_to_show_deleted(service: UserService) -> None:
    for n in range(3):
        await _create(service, f"rita{n}@example.com")
    ctx = RequestContext(ADMIN)
    shown = await service.list_users(
        page_size=1, page_token="", email="", show_deleted=True, ctx=ctx
    )
    plain = await service.list_users(page_size=1, page_token="", email="", ctx=ctx)
    for token, show in ((shown.next_page_token, False), (plain.next_page_token, True)):
        with pytest.raises(ValidationFailed) as err:
            await service.list_users(
                page_size=1, page_token=token, email="", show_deleted=show, ctx=ctx
            )
        assert _violations(err) == [("page_token", "INVALID_PAGE_TOKEN")]


async def test_purge_removes_due_users_frees_the_email_and_tombstones_the_audit_trail(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    gone = await _create(service, "sam@example.com", name="Sam Secret")
    later = await _create(service, "sue@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(gone.id))
    clock.advance(timedelta(days=1))
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(later.id))
    clock.advance(timedelta(days=29) - timedelta(seconds=1))
    assert await service.purge_deleted_users() == 0
    clock.advance(timedelta(seconds=1))
    # Due: the first (deleted 30 days ago); not yet: the second (a day younger).
    assert await service.purge_deleted_users() == 1
    assert set(uow.store) == {later.id}
    trail = [e for e in uow.audit if e.user_id == gone.id]
    assert [e.action for e in trail] == ["user.created", "user.deleted", "user.purged"]
    assert trail[0].changes["email"] == {"old": None, "new": "[PURGED]"}
    assert trail[0].changes["name"] == {"old": None, "new": "[PURGED]"}
    assert trail[0].changes["roles"] == {"old": None, "new": []}
    assert "sam@example.com" not in repr(trail) and "Sam Secret" not in repr(trail)
    assert (trail[-1].actor, trail[-1].request_id[:6]) == ("system", "purge-")
    # The other user's trail is untouched, and the e-mail is free again.
    assert any(e.changes.get("email", {}).get("new") == "sue@example.com" for e in uow.audit)
    again = await _create(service, "sam@example.com")
    assert again.id != gone.id


async def test_purge_works_through_more_than_one_batch(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    for n in range(5):
        created = await _create(service, f"tom{n}@example.com")
        await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    clock.advance(timedelta(days=31))
    assert await service.purge_deleted_users(batch=2) == 5
    assert uow.store == {}


async def test_an_undeleted_user_is_not_purged(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    created = await _create(service, "ursula@example.com")
    await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    await service.undelete_user(ctx=RequestContext(ADMIN), user_id=str(created.id))
    clock.advance(timedelta(days=365))
    assert await service.purge_deleted_users() == 0
    assert set(uow.store) == {created.id}


async def test_delete_with_a_stale_etag_is_etag_mismatch_and_keeps_the_user(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await _create(service, "pia@example.com")
    updated = await _update(
        service,
        MEMBER,
        user_id=str(created.id),
        paths=["name"],
        email="",
        name="Pia",
        etag="",
    )
    with pytest.raises(EtagMismatch):
        await service.delete_user(
            ctx=RequestContext(ADMIN), user_id=str(created.id), etag=created.etag
        )
    assert uow.views == {created.id: updated}
    _assert_rolled_back(uow.last)


async def test_delete_of_an_unknown_user_is_user_not_found(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    kept = await _create(service, "quinn@example.com")
    with pytest.raises(UserNotFound):
        await service.delete_user(ctx=RequestContext(ADMIN), user_id=str(uuid.uuid4()))
    assert uow.views == {kept.id: kept}
    _assert_rolled_back(uow.last)


async def test_delete_with_a_malformed_id_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.delete_user(ctx=RequestContext(ADMIN), user_id="nope")
    assert _violations(err) == [("id", "INVALID_FORMAT")]
    assert uow.opened == []


# --- the fakes keep the real contract ---------------------------------------------------------


async def test_fake_unit_of_work_discards_what_was_not_committed(
    uow: FakeUnitOfWorkFactory,
) -> None:
    user = _stored_user(1, START)
    async with uow() as tx:
        await tx.users.add(user)
        assert await tx.users.get(user.id) == user
    assert tx.rolled_back
    assert uow.store == {}
    async with uow() as tx:
        await tx.users.add(user)
        await tx.commit()
    assert not tx.rolled_back
    assert uow.store == {user.id: user}


async def test_fake_repository_refuses_columns_the_real_one_refuses(
    uow: FakeUnitOfWorkFactory,
) -> None:
    user = _stored_user(1, START)
    async with uow() as tx:
        await tx.users.add(user)
        with pytest.raises(ValueError, match="not writable"):
            await tx.users.update(user.id, {"version": 7})
