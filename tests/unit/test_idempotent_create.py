"""Idempotent CreateUser (AIP-155) on in-memory fakes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from tests.unit.conftest import START, UserServiceFactory
from tests.unit.fakes import FakeClock, FakePasswordHasher, FakeUnitOfWorkFactory
from usersvc.domain import audit
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import DuplicateRequest, EmailTaken, ValidationFailed
from usersvc.domain.models import UserView
from usersvc.services.users import UserService

ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))
SERVICE = Principal(user_id=uuid.uuid4(), roles=frozenset({"service"}))
PASSWORD = "correct horse battery staple"
TTL = timedelta(hours=24)


class YieldingHasher(FakePasswordHasher):
    """Gives other tasks a turn while "hashing", as the real thread-pool hasher does."""

    async def hash(self, password: str) -> str:
        for _ in range(3):
            await asyncio.sleep(0)
        return await super().hash(password)


@pytest.fixture
def service(make_user_service: UserServiceFactory) -> UserService:
    return make_user_service(
        fingerprint_key=b"unit-test-fingerprint-key",
        idempotency_ttl_seconds=int(TTL.total_seconds()),
    )


@pytest.fixture
def request_id() -> str:
    return str(uuid.uuid4())


async def _create(
    service: UserService,
    request_id: str,
    *,
    actor: Principal = ADMIN,
    email: str = "alice@example.com",
    name: str = "Alice",
    password: str = PASSWORD,
) -> UserView:
    return await service.create_user(
        ctx=RequestContext(actor), email=email, name=name, password=password, request_id=request_id
    )


def _public(user: UserView) -> tuple[object, ...]:
    """What CreateUserResponse shows of a user."""
    return (
        user.id,
        user.email,
        user.name,
        user.roles,
        user.state,
        user.create_time,
        user.update_time,
        user.etag,
    )


def _assert_reused(err: pytest.ExceptionInfo[ValidationFailed]) -> None:
    assert err.value.reason == "REQUEST_ID_REUSED"
    assert [(v.field, v.reason) for v in err.value.violations] == [
        ("request_id", "REQUEST_ID_REUSED")
    ]


async def test_a_retry_returns_the_first_user_and_creates_nothing(
    service: UserService,
    uow: FakeUnitOfWorkFactory,
    clock: FakeClock,
    hasher: FakePasswordHasher,
    request_id: str,
) -> None:
    first = await _create(service, request_id)
    writes_before = sum(1 for tx in uow.opened if tx.write)
    clock.advance(TTL - timedelta(seconds=1))  # still within the retention period
    again = await _create(service, request_id)
    assert _public(again) == _public(first)
    assert list(uow.store) == [first.id]
    assert len(uow.outbox) == 1
    assert [e.action for e in uow.audit] == [audit.USER_CREATED]
    assert len(uow.db.idempotency) == 1
    # The retry is answered from the remembered result: no hashing, no write transaction.
    assert hasher.hashed == [PASSWORD]
    assert sum(1 for tx in uow.opened if tx.write) == writes_before


async def test_a_retry_is_recognised_after_normalisation_of_payload_and_request_id(
    service: UserService, uow: FakeUnitOfWorkFactory, request_id: str
) -> None:
    first = await _create(service, request_id)
    again = await _create(
        service, request_id.upper(), email="  ALICE@Example.com ", name="  Alice  "
    )
    assert again.id == first.id
    assert len(uow.store) == 1


@pytest.mark.parametrize("field", ["email", "name", "password"])
async def test_the_same_request_id_with_another_payload_is_refused(
    service: UserService, uow: FakeUnitOfWorkFactory, request_id: str, field: str
) -> None:
    first = await _create(service, request_id)
    with pytest.raises(ValidationFailed) as err:
        await _create(
            service,
            request_id,
            email="other@example.com" if field == "email" else first.email,
            name="Alicia" if field == "name" else first.name,
            password="a different password" if field == "password" else PASSWORD,
        )
    _assert_reused(err)
    assert list(uow.store) == [first.id]
    assert len(uow.audit) == 1
    assert "different password" not in str(err.value)


async def test_another_caller_with_the_same_request_id_gets_its_own_user(
    service: UserService, uow: FakeUnitOfWorkFactory, request_id: str
) -> None:
    mine = await _create(service, request_id)
    theirs = await _create(service, request_id, actor=SERVICE, email="bob@example.com")
    assert theirs.id != mine.id
    assert set(uow.store) == {mine.id, theirs.id}
    assert set(uow.db.idempotency) == {
        (str(ADMIN.user_id), request_id),
        (str(SERVICE.user_id), request_id),
    }
    # And each caller's retry still finds its own user.
    assert (await _create(service, request_id)).id == mine.id
    again = await _create(service, request_id, actor=SERVICE, email="bob@example.com")
    assert again.id == theirs.id


async def test_another_caller_with_the_same_request_id_and_payload_is_a_new_create(
    service: UserService, request_id: str
) -> None:
    await _create(service, request_id)
    # Not the first caller's result: a separate create, refused because the email is taken.
    with pytest.raises(EmailTaken):
        await _create(service, request_id, actor=SERVICE)


@pytest.mark.parametrize("bad", ["not-a-uuid", "1234", str(uuid.uuid4()) + "0"])
async def test_a_malformed_request_id_is_a_validation_error(
    service: UserService, uow: FakeUnitOfWorkFactory, bad: str
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await _create(service, bad)
    assert [v.field for v in err.value.violations] == ["request_id"]
    assert uow.store == {}
    assert uow.opened == []


async def test_without_request_id_nothing_is_remembered(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    await _create(service, "")
    assert uow.db.idempotency == {}
    with pytest.raises(EmailTaken):
        await _create(service, "")


async def test_the_remembered_request_holds_no_password_or_hash(
    service: UserService, uow: FakeUnitOfWorkFactory, request_id: str
) -> None:
    user = await _create(service, request_id)
    (record,) = uow.db.idempotency.values()
    stored = repr(record)
    assert PASSWORD not in stored
    assert uow.store[user.id].password_hash not in stored
    assert "password" not in record.result


async def test_the_key_is_written_in_the_creating_transaction(
    service: UserService, uow: FakeUnitOfWorkFactory, request_id: str
) -> None:
    await _create(service, request_id)
    creating = next(tx for tx in uow.opened if tx.write)
    assert creating.commits == 1
    assert [tx.write for tx in uow.opened] == [False, True]  # look-up, then one transaction


async def test_purge_forgets_keys_older_than_the_retention_period_only(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    old_id, young_id = str(uuid.uuid4()), str(uuid.uuid4())
    old = await _create(service, old_id)
    clock.advance(timedelta(hours=2))
    young = await _create(service, young_id, email="young@example.com")
    clock.advance(TTL - timedelta(hours=1))  # old: 25 h, young: 23 h
    assert await service.purge_idempotency_keys() == 1
    assert set(uow.db.idempotency) == {(str(ADMIN.user_id), young_id)}
    assert (await _create(service, young_id, email="young@example.com")).id == young.id
    # The forgotten id is a new request: with the old payload the email is taken ...
    with pytest.raises(EmailTaken):
        await _create(service, old_id)
    # ... and with another payload it creates another user instead of REQUEST_ID_REUSED.
    fresh = await _create(service, old_id, email="fresh@example.com")
    assert fresh.id not in (old.id, young.id)
    assert len(uow.store) == 3


async def test_the_retention_period_is_a_setting(
    uow: FakeUnitOfWorkFactory,
    make_user_service: UserServiceFactory,
    clock: FakeClock,
    request_id: str,
) -> None:
    service = make_user_service(idempotency_ttl_seconds=3600)
    await _create(service, request_id)
    clock.advance(timedelta(minutes=59))
    assert await service.purge_idempotency_keys() == 0
    clock.advance(timedelta(minutes=2))
    assert await service.purge_idempotency_keys() == 1
    assert uow.db.idempotency == {}


async def test_an_expired_but_unpurged_request_id_is_a_new_request(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock, request_id: str
) -> None:
    first = await _create(service, request_id)
    clock.advance(TTL + timedelta(minutes=1))  # expired; the hourly purge has not run yet
    fresh = await _create(service, request_id, email="fresh@example.com")
    assert fresh.id != first.id
    assert len(uow.store) == 2


async def test_concurrent_creates_with_one_request_id_and_different_payloads(
    uow: FakeUnitOfWorkFactory, make_user_service: UserServiceFactory, request_id: str
) -> None:
    """The loser's insert of the key fails (DuplicateRequest): it answers REQUEST_ID_REUSED."""
    service = make_user_service(hasher=YieldingHasher())
    results = await asyncio.gather(
        _create(service, request_id, email="one@example.com"),
        _create(service, request_id, email="two@example.com"),
        return_exceptions=True,
    )
    users = [r for r in results if isinstance(r, UserView)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(users) == 1
    assert len(errors) == 1
    assert isinstance(errors[0], ValidationFailed)
    assert errors[0].reason == "REQUEST_ID_REUSED"
    assert list(uow.store) == [users[0].id]


async def test_concurrent_retries_with_one_request_id_return_the_same_user(
    uow: FakeUnitOfWorkFactory, make_user_service: UserServiceFactory, request_id: str
) -> None:
    service = make_user_service(hasher=YieldingHasher())
    first, second = await asyncio.gather(_create(service, request_id), _create(service, request_id))
    assert _public(first) == _public(second)
    assert len(uow.store) == 1


async def test_the_fake_refuses_a_duplicate_key_like_the_primary_key_does(
    uow: FakeUnitOfWorkFactory,
) -> None:
    async with uow() as tx:
        await tx.idempotency.add(caller="c", request_id="r", fingerprint="f", result={}, now=START)
        with pytest.raises(DuplicateRequest):
            await tx.idempotency.add(
                caller="c", request_id="r", fingerprint="g", result={}, now=START
            )
        await tx.idempotency.add(
            caller="other", request_id="r", fingerprint="f", result={}, now=START
        )
        await tx.commit()
    assert set(uow.db.idempotency) == {("c", "r"), ("other", "r")}
