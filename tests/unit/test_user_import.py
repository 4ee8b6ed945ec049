"""BatchCreateUsers in the service layer, on fakes: what is hashed, written and remembered."""

from __future__ import annotations

import uuid
from collections.abc import Collection

import pytest

from tests.unit.fakes import FakePasswordHasher, FakeUnitOfWorkFactory, FakeUserRepository
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import (
    BatchAborted,
    EmailLookalike,
    EmailTaken,
    PermissionDenied,
    ValidationFailed,
)
from usersvc.services.ports import PasswordHasher
from usersvc.services.user_import import BATCH_CREATE_MAX, NewUserEntry
from usersvc.services.users import UserService

ADMIN = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"})), "req-1")
SERVICE = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"})))
PASSWORD = "correct horse battery staple"
BCRYPT = "$2b$04$" + "a" * 53


def new(email: str, **fields: object) -> NewUserEntry:
    values: dict[str, object] = {"email": email, "name": "Imported", "password": PASSWORD}
    values.update(fields)
    return NewUserEntry(**values)  # type: ignore[arg-type]


async def test_only_plain_passwords_are_hashed_and_one_transaction_writes_all(
    service: UserService, uow: FakeUnitOfWorkFactory, hasher: PasswordHasher
) -> None:
    assert isinstance(hasher, FakePasswordHasher)
    entries = [
        new("a@example.com"),
        new("b@example.com", password=None, password_hash=BCRYPT),
        new("c@example.com", password="other pass phrase"),
    ]
    outcomes = await service.batch_create_users(ctx=ADMIN, entries=entries)
    assert [o.error for o in outcomes] == [None, None, None]
    assert sorted(hasher.hashed) == sorted([PASSWORD, "other pass phrase"])
    stored = {u.email: u.password_hash for u in uow.store.values()}
    assert stored["b@example.com"] == BCRYPT
    assert stored["a@example.com"] == FakePasswordHasher.hash_of(PASSWORD)
    assert sum(u.commits for u in uow.opened) == 1
    assert [m.aggregate_id for m in uow.outbox] == [o.user.id for o in outcomes if o.user]
    formats = [e.changes["password_format"]["new"] for e in uow.audit]
    assert formats == ["argon2id", "bcrypt", "argon2id"]
    assert all(e.request_id == "req-1" for e in uow.audit)


async def test_all_or_nothing_hashes_and_writes_nothing_when_an_entry_fails(
    service: UserService, uow: FakeUnitOfWorkFactory, hasher: PasswordHasher
) -> None:
    assert isinstance(hasher, FakePasswordHasher)
    outcomes = await service.batch_create_users(
        ctx=ADMIN,
        entries=[new("a@example.com"), new("b@example.com", name="")],
        all_or_nothing=True,
    )
    assert isinstance(outcomes[0].error, BatchAborted)
    assert isinstance(outcomes[1].error, ValidationFailed)
    assert hasher.hashed == []
    assert uow.store == {}
    assert uow.audit == []
    assert uow.outbox == []


async def test_in_batch_duplicates_and_look_alikes_fail_the_later_entries(
    service: UserService,
) -> None:
    outcomes = await service.batch_create_users(
        ctx=ADMIN,
        entries=[
            new("bob@example.com"),
            new(" BOB@example.com"),
            new("b\u043eb@example.com"),  # Cyrillic o
        ],
    )
    assert outcomes[0].user is not None
    assert isinstance(outcomes[1].error, EmailTaken)
    assert isinstance(outcomes[2].error, EmailLookalike)


async def test_credentials_must_be_exactly_one(service: UserService) -> None:
    outcomes = await service.batch_create_users(
        ctx=ADMIN,
        entries=[
            new("a@example.com", password=None),
            new("b@example.com", password_hash=BCRYPT),
            new("c@example.com", password="short"),
        ],
    )
    fields = [
        [v.field for v in o.error.violations]
        for o in outcomes
        if isinstance(o.error, ValidationFailed)
    ]
    assert fields == [["users[0].password"], ["users[1].password_hash"], ["users[2].password"]]


async def test_roles_are_granted_only_when_the_caller_holds_them(service: UserService) -> None:
    outcomes = await service.batch_create_users(
        ctx=ADMIN,
        entries=[
            new("a@example.com", roles=("admin",)),
            new("b@example.com", roles=("service",)),
            new("c@example.com", roles=("root",)),
        ],
    )
    assert outcomes[0].user is not None and outcomes[0].user.roles == ("admin",)
    assert isinstance(outcomes[1].error, PermissionDenied)
    assert isinstance(outcomes[2].error, ValidationFailed)


async def test_the_batch_itself_is_bounded_and_admin_only(service: UserService) -> None:
    too_many = [new(f"u{i}@example.com") for i in range(BATCH_CREATE_MAX + 1)]
    with pytest.raises(ValidationFailed) as caught:
        await service.batch_create_users(ctx=ADMIN, entries=too_many)
    assert [v.field for v in caught.value.violations] == ["users"]
    with pytest.raises(ValidationFailed):
        await service.batch_create_users(ctx=ADMIN, entries=[])
    with pytest.raises(PermissionDenied):
        await service.batch_create_users(ctx=SERVICE, entries=[new("a@example.com")])


async def test_a_retry_answers_from_memory_and_another_body_is_refused(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    request_id = str(uuid.uuid4())
    entries = [new("a@example.com"), new("bad", password=None, password_hash="$x$")]
    first = await service.batch_create_users(ctx=ADMIN, entries=entries, request_id=request_id)
    again = await service.batch_create_users(ctx=ADMIN, entries=entries, request_id=request_id)
    assert [o.user for o in again] == [o.user for o in first]
    assert isinstance(again[1].error, ValidationFailed)
    assert again[1].error.violations == first[1].error.violations  # type: ignore[union-attr]
    assert len(uow.store) == 1
    with pytest.raises(ValidationFailed) as caught:
        await service.batch_create_users(
            ctx=ADMIN, entries=entries[:1], request_id=request_id.upper()
        )
    assert caught.value.reason == "REQUEST_ID_REUSED"


async def test_an_email_taken_between_the_check_and_the_insert_is_checked_again(
    service: UserService, uow: FakeUnitOfWorkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await service.batch_create_users(ctx=ADMIN, entries=[new("taken@example.com")])
    real = FakeUserRepository.email_conflicts
    calls = 0

    async def blind_twice(self: FakeUserRepository, emails: Collection[str]) -> dict[str, bool]:
        # The check before hashing and the one in the first transaction both miss the row,
        # as they would if a concurrent call committed it just after each check.
        nonlocal calls
        calls += 1
        return {} if calls <= 2 else await real(self, emails)

    monkeypatch.setattr(FakeUserRepository, "email_conflicts", blind_twice)
    outcomes = await service.batch_create_users(
        ctx=ADMIN, entries=[new("fresh@example.com"), new("taken@example.com")]
    )
    assert calls == 3
    assert outcomes[0].user is not None
    assert isinstance(outcomes[1].error, EmailTaken)
    assert sorted(u.email for u in uow.store.values()) == ["fresh@example.com", "taken@example.com"]
