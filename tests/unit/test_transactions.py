"""in_transaction: a fresh unit of work per attempt, bounded retries of transient conflicts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from tests.unit.fakes import FakeUnitOfWorkFactory
from usersvc.domain import audit
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import (
    ConcurrencyConflict,
    EmailTaken,
    EtagMismatch,
    RetryableConflict,
    StorageUnavailable,
)
from usersvc.domain.models import User, UserState
from usersvc.domain.user_filter import UserFilter
from usersvc.services import transactions
from usersvc.services.ports import UnitOfWork
from usersvc.services.transactions import BASE_DELAY_SECONDS, MAX_ATTEMPTS, in_transaction
from usersvc.services.users import UserService

START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))


class FakeSleep:
    """Records the delays it was asked to wait, and waits for none of them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Flaky:
    """A unit-of-work body that conflicts `conflicts` times, then stores a user and commits."""

    def __init__(
        self, conflicts: int, error: BaseException | None = None, prefix: str = "attempt"
    ) -> None:
        self.prefix = prefix
        self.conflicts = conflicts
        self.error = error or RetryableConflict("transaction conflict (40001)")
        self.calls = 0

    async def __call__(self, uow: UnitOfWork) -> str:
        self.calls += 1
        # A write before the conflict: it must not survive the failed attempt.
        await uow.users.add(_user(f"{self.prefix}{self.calls}@example.com"))
        if self.calls <= self.conflicts:
            raise self.error
        await uow.commit()
        return f"done after {self.calls}"


def _user(email: str) -> User:
    return User(
        id=uuid.uuid4(),
        email=email,
        name="Some One",
        password_hash="fake",
        roles=(),
        state=UserState.ACTIVE,
        create_time=START,
        update_time=START,
        version=1,
    )


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


async def test_a_body_without_conflict_runs_once_and_never_sleeps(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep
) -> None:
    body = Flaky(conflicts=0)
    assert await in_transaction(uow, body, sleep=sleep) == "done after 1"
    assert body.calls == 1
    assert len(uow.opened) == 1
    assert uow.last.write
    assert uow.last.commits == 1
    assert sleep.delays == []


@pytest.mark.parametrize("conflicts", [1, MAX_ATTEMPTS - 1])
async def test_retryable_conflicts_are_retried_in_a_fresh_unit_of_work(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep, conflicts: int
) -> None:
    body = Flaky(conflicts=conflicts)
    result = await in_transaction(uow, body, sleep=sleep)
    assert result == f"done after {conflicts + 1}"
    assert body.calls == conflicts + 1
    # One unit of work per attempt; every failed one was left without committing.
    assert len(uow.opened) == conflicts + 1
    assert all(tx.rolled_back for tx in uow.opened[:-1])
    assert uow.last.commits == 1
    # Only the successful attempt's write is stored.
    assert [u.email for u in uow.store.values()] == [f"attempt{conflicts + 1}@example.com"]
    assert len(sleep.delays) == conflicts


async def test_gives_up_after_max_attempts_with_concurrency_conflict(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep
) -> None:
    body = Flaky(conflicts=MAX_ATTEMPTS)
    with pytest.raises(ConcurrencyConflict) as err:
        await in_transaction(uow, body, sleep=sleep)
    # The surfaced error is the non-retryable parent (ABORTED, CONCURRENT_MODIFICATION) ...
    assert not isinstance(err.value, RetryableConflict)
    assert err.value.reason == "CONCURRENT_MODIFICATION"
    # ... caused by the last conflict.
    assert isinstance(err.value.__cause__, RetryableConflict)
    assert body.calls == MAX_ATTEMPTS
    assert len(uow.opened) == MAX_ATTEMPTS
    assert all(tx.rolled_back for tx in uow.opened)
    assert uow.store == {}
    # No pointless wait after the last attempt.
    assert len(sleep.delays) == MAX_ATTEMPTS - 1


async def test_the_number_of_attempts_is_a_parameter(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep
) -> None:
    body = Flaky(conflicts=1)
    with pytest.raises(ConcurrencyConflict):
        await in_transaction(uow, body, attempts=1, sleep=sleep)
    assert body.calls == 1
    assert sleep.delays == []


async def test_delays_are_full_jitter_with_an_exponentially_growing_bound(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high / 2

    monkeypatch.setattr("usersvc.services.transactions.random.uniform", uniform)
    await in_transaction(uow, Flaky(conflicts=MAX_ATTEMPTS - 1), sleep=sleep)
    expected = [(0, BASE_DELAY_SECONDS * 2**attempt) for attempt in range(1, MAX_ATTEMPTS)]
    assert bounds == expected
    assert sleep.delays == [high / 2 for _, high in expected]


async def test_real_jitter_stays_within_its_bounds(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep
) -> None:
    for run in range(20):
        await in_transaction(
            uow, Flaky(conflicts=MAX_ATTEMPTS - 1, prefix=f"run{run}-"), sleep=sleep
        )
    per_attempt = [sleep.delays[i :: MAX_ATTEMPTS - 1] for i in range(MAX_ATTEMPTS - 1)]
    for attempt, delays in enumerate(per_attempt, start=1):
        assert all(0 <= d <= BASE_DELAY_SECONDS * 2**attempt for d in delays)
    assert len(set(sleep.delays)) > 1  # jittered, not one fixed delay


@pytest.mark.parametrize(
    "error",
    [
        EmailTaken(),
        EtagMismatch(),
        StorageUnavailable(),
        ConcurrencyConflict("not retryable"),
        ValueError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_other_errors_are_not_retried(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep, error: BaseException
) -> None:
    body = Flaky(conflicts=1, error=error)
    with pytest.raises(type(error)) as raised:
        await in_transaction(uow, body, sleep=sleep)
    assert raised.value is error
    assert body.calls == 1
    assert len(uow.opened) == 1
    assert uow.last.rolled_back
    assert uow.store == {}
    assert sleep.delays == []


async def test_a_read_only_body_gets_a_read_only_unit_of_work(
    uow: FakeUnitOfWorkFactory, sleep: FakeSleep
) -> None:
    async def read(tx: UnitOfWork) -> int:
        return await tx.users.count(where=UserFilter())

    assert await in_transaction(uow, read, write=False, sleep=sleep) == 0
    assert not uow.last.write


async def test_a_use_case_retried_after_a_conflict_writes_once_with_one_audit_event(
    uow: FakeUnitOfWorkFactory, service: UserService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's bodies are safe to run again: no double write, no second audit event."""
    monkeypatch.setattr(transactions, "BASE_DELAY_SECONDS", 0.0)  # asyncio.sleep(0)
    created = await service.create_user(
        ctx=RequestContext(ADMIN),
        email="retry@example.com",
        name="Retry",
        password="correct horse battery",
    )
    calls = 0
    original = type(uow.last.users).update

    async def conflicting_once(self: object, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RetryableConflict("transaction conflict (40P01)")
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(uow.last.users), "update", conflicting_once)
    updated = await service.update_user(
        ctx=RequestContext(ADMIN),
        user_id=str(created.id),
        paths=["name"],
        email="",
        name="Retried",
        etag=created.etag,
    )
    assert calls == 2
    assert (updated.name, updated.version) == ("Retried", 2)
    assert uow.store[created.id].view() == updated
    assert [e.action for e in uow.audit] == [audit.USER_CREATED, audit.USER_UPDATED]


async def test_a_use_case_that_keeps_conflicting_surfaces_concurrency_conflict(
    uow: FakeUnitOfWorkFactory, service: UserService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transactions, "BASE_DELAY_SECONDS", 0.0)
    created = await service.create_user(
        ctx=RequestContext(ADMIN),
        email="stuck@example.com",
        name="Stuck",
        password="correct horse battery",
    )

    async def always_conflicting(self: object, *args: object, **kwargs: object) -> object:
        raise RetryableConflict("transaction conflict (40001)")

    monkeypatch.setattr(type(uow.last.users), "update", always_conflicting)
    opened_before = len(uow.opened)
    with pytest.raises(ConcurrencyConflict) as err:
        await service.disable_user(ctx=RequestContext(ADMIN), user_id=str(created.id), etag="")
    assert err.value.reason == "CONCURRENT_MODIFICATION"
    assert len(uow.opened) - opened_before == MAX_ATTEMPTS
    assert uow.store[created.id].view() == created
    assert [e.action for e in uow.audit] == [audit.USER_CREATED]
