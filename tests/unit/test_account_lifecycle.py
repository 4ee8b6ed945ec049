"""Unlock, login counters shown to admins only, last login and password change times, and the
dormant-account job, on in-memory fakes with a clock that moves only when told to."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.conftest import START, UserServiceFactory
from tests.unit.fakes import FakeClock, FakePasswordHasher, FakeUnitOfWorkFactory
from usersvc.adapters.jwt_tokens import AccessTokenCodec, KeySet, generate_private_key_file
from usersvc.domain import audit
from usersvc.domain.auth import Principal, RequestContext, TokenPair
from usersvc.domain.errors import (
    EtagMismatch,
    PermissionDenied,
    Unauthenticated,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.models import SERVICE_ACCOUNT_PASSWORD_HASH, User, UserState, UserView
from usersvc.services.auth import AuthService, TokenStateCache
from usersvc.services.users import UserService

ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))
SERVICE = Principal(user_id=uuid.uuid4(), roles=frozenset({"service"}))
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase 42"
MAX_FAILURES = 3
LOCK = timedelta(seconds=60)


class StableHasher(FakePasswordHasher):
    """Fake hashes that never need a rehash, so a login writes only what it must."""

    def needs_rehash(self, password_hash: str) -> bool:
        return False


@pytest.fixture
def hasher() -> StableHasher:
    return StableHasher()


@pytest.fixture
def revoked() -> list[uuid.UUID]:
    return []


@pytest.fixture
def service(make_user_service: UserServiceFactory, revoked: list[uuid.UUID]) -> UserService:
    return make_user_service(
        login_max_failures=MAX_FAILURES,
        login_lock_seconds=int(LOCK.total_seconds()),
        on_tokens_revoked=revoked.append,
    )


@pytest.fixture
def auth_service(
    uow: FakeUnitOfWorkFactory, hasher: StableHasher, clock: FakeClock, tmp_path: Path
) -> AuthService:
    key = tmp_path / "signing.pem"
    generate_private_key_file(key)
    tokens = AccessTokenCodec(
        KeySet.load(key, []), issuer="usersvc", audience="usersvc", ttl_seconds=600, leeway=30
    )
    return AuthService(
        uow=uow,
        hasher=hasher,
        dummy_hash=hasher.hash_of("dummy password for timing"),
        tokens=tokens,
        states=TokenStateCache(uow, ttl=0),
        refresh_ttl_seconds=3600,
        max_failures=MAX_FAILURES,
        lock_seconds=int(LOCK.total_seconds()),
        clock=clock,
    )


async def _create(service: UserService, email: str = "alice@example.com") -> UserView:
    return await service.create_user(
        ctx=RequestContext(ADMIN), email=email, name="Alice", password=PASSWORD
    )


async def _login(auth: AuthService, email: str, password: str = PASSWORD) -> TokenPair:
    return await auth.login(email=email, password=password)


async def _fail_logins(auth: AuthService, email: str, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Unauthenticated):
            await _login(auth, email, "not the password at all")


# --- last login and password change times -----------------------------------------------------


async def test_login_sets_the_last_login_time_without_a_new_version(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    user = await _create(service)
    assert user.last_login_time is None
    clock.advance(timedelta(hours=1))
    pair = await _login(auth_service, user.email)
    stored = uow.store[user.id]
    assert stored.last_login_time == START + timedelta(hours=1)
    # Not a change of the resource: etag and update_time stay.
    assert (stored.version, stored.update_time) == (user.version, user.update_time)
    # A refresh is not a login.
    clock.advance(timedelta(minutes=10))
    await auth_service.refresh(refresh_token=pair.refresh_token)
    assert uow.store[user.id].last_login_time == START + timedelta(hours=1)
    # A failed login is not one either.
    await _fail_logins(auth_service, user.email, 1)
    assert uow.store[user.id].last_login_time == START + timedelta(hours=1)


async def test_password_change_time_is_set_at_creation_and_by_every_change(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    user = await _create(service)
    assert user.password_change_time == START
    clock.advance(timedelta(days=1))
    by_self = await service.change_password(
        ctx=RequestContext(Principal(user.id, frozenset())),
        user_id=str(user.id),
        current_password=PASSWORD,
        new_password=NEW_PASSWORD,
        etag="",
    )
    assert by_self.password_change_time == START + timedelta(days=1)
    clock.advance(timedelta(days=1))
    by_admin = await service.change_password(
        ctx=RequestContext(ADMIN),
        user_id=str(user.id),
        current_password="",
        new_password=PASSWORD,
        etag="",
    )
    assert by_admin.password_change_time == START + timedelta(days=2)
    assert uow.store[user.id].password_change_time == START + timedelta(days=2)
    # The audit trail records the password change as before, without the time as a field.
    assert "password_change_time" not in uow.audit[-1].changes
    # Other updates leave it alone.
    clock.advance(timedelta(days=1))
    renamed = await service.update_user(
        ctx=RequestContext(ADMIN),
        user_id=str(user.id),
        paths=["name"],
        email="",
        name="Alice B",
        etag="",
    )
    assert renamed.password_change_time == START + timedelta(days=2)


# --- login counters: admins only --------------------------------------------------------------


async def test_login_counters_are_shown_to_admins_only(
    service: UserService, auth_service: AuthService, clock: FakeClock
) -> None:
    user = await _create(service)
    await _fail_logins(auth_service, user.email, MAX_FAILURES)
    me = Principal(user.id, frozenset())
    seen_by_admin = await service.get_user(str(user.id), ctx=RequestContext(ADMIN))
    assert seen_by_admin.failed_login_count == MAX_FAILURES
    assert seen_by_admin.locked_until == START + LOCK
    for ctx in (RequestContext(me), RequestContext(SERVICE), None):
        seen = await service.get_user(str(user.id), ctx=ctx)
        assert (seen.failed_login_count, seen.locked_until) == (0, None), ctx
        # The rest of the user is the same.
        assert seen == dataclasses.replace(seen_by_admin, failed_login_count=0, locked_until=None)
    listed = await service.list_users(
        page_size=10, page_token="", email=user.email, ctx=RequestContext(SERVICE)
    )
    assert [(u.failed_login_count, u.locked_until) for u in listed.users] == [(0, None)]
    listed = await service.list_users(
        page_size=10, page_token="", email=user.email, ctx=RequestContext(ADMIN)
    )
    assert [u.failed_login_count for u in listed.users] == [MAX_FAILURES]
    batch = await service.batch_get_users(ctx=RequestContext(me), user_ids=[str(user.id)])
    assert [u.failed_login_count for u in batch.users] == [0]


# --- every password check honours the lock ----------------------------------------------------


async def test_a_locked_account_accepts_no_password_anywhere(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    """Login and ChangePassword's current_password are the two places a password is
    checked; while the account is locked both refuse even the correct one, and neither
    extends the lock or counts."""
    user = await _create(service)
    await _fail_logins(auth_service, user.email, MAX_FAILURES)
    locked = uow.store[user.id]
    assert locked.locked_until == START + LOCK
    with pytest.raises(Unauthenticated):
        await _login(auth_service, user.email)
    with pytest.raises(ValidationFailed) as refused:
        await service.change_password(
            ctx=RequestContext(Principal(user.id, frozenset())),
            user_id=str(user.id),
            current_password=PASSWORD,
            new_password=NEW_PASSWORD,
            etag="",
        )
    assert refused.value.violations[0].field == "current_password"
    after = uow.store[user.id]
    assert (after.failed_login_count, after.locked_until) == (MAX_FAILURES, START + LOCK)
    assert after.password_hash == locked.password_hash


async def test_wrong_current_passwords_lock_the_account_for_login_too(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    for _ in range(MAX_FAILURES):
        with pytest.raises(ValidationFailed):
            await service.change_password(
                ctx=RequestContext(Principal(user.id, frozenset())),
                user_id=str(user.id),
                current_password="not the password at all",
                new_password=NEW_PASSWORD,
                etag="",
            )
    assert uow.store[user.id].locked_until == START + LOCK
    with pytest.raises(Unauthenticated):
        await _login(auth_service, user.email)


# --- UnlockUser -------------------------------------------------------------------------------


async def test_unlock_clears_the_lock_and_the_counter_with_an_audit_record(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    user = await _create(service)
    await _fail_logins(auth_service, user.email, MAX_FAILURES)
    before = uow.store[user.id]
    clock.advance(timedelta(seconds=5))
    unlocked = await service.unlock_user(
        ctx=RequestContext(ADMIN, request_id="req-unlock"), user_id=str(user.id), etag=before.etag
    )
    assert (unlocked.failed_login_count, unlocked.locked_until) == (0, None)
    assert unlocked.version == before.version + 1
    assert unlocked.token_version == before.token_version  # tokens stay valid
    event = uow.audit[-1]
    assert event.action == audit.USER_UNLOCKED == "user.unlocked"
    assert event.actor == str(ADMIN.user_id)
    assert event.request_id == "req-unlock"
    assert event.changes == {
        "failed_login_count": {"old": MAX_FAILURES, "new": 0},
        "locked_until": {"old": (START + LOCK).isoformat(), "new": None},
    }
    # The correct password works at once.
    assert (await _login(auth_service, user.email)).access_token


async def test_unlock_of_a_user_without_lock_or_failures_changes_nothing(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    events = len(uow.audit)
    again = await service.unlock_user(ctx=RequestContext(ADMIN), user_id=str(user.id), etag="")
    assert again.etag == user.etag
    assert len(uow.audit) == events


async def test_unlock_refuses_non_admins_stale_etags_and_unknown_users(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await _fail_logins(auth_service, user.email, 1)
    with pytest.raises(PermissionDenied):
        await service.unlock_user(
            ctx=RequestContext(Principal(user.id, frozenset())), user_id=str(user.id), etag=""
        )
    with pytest.raises(EtagMismatch):
        await service.unlock_user(ctx=RequestContext(ADMIN), user_id=str(user.id), etag='"99"')
    with pytest.raises(UserNotFound):
        await service.unlock_user(ctx=RequestContext(ADMIN), user_id=str(uuid.uuid4()), etag="")
    with pytest.raises(ValidationFailed):
        await service.unlock_user(ctx=RequestContext(ADMIN), user_id="not-a-uuid", etag="")
    assert uow.store[user.id].failed_login_count == 1


# --- the dormant-account job ------------------------------------------------------------------

DAYS = 90


def _stored(
    uow: FakeUnitOfWorkFactory,
    *,
    created: datetime,
    last_login: datetime | None = None,
    password_hash: str = FakePasswordHasher.hash_of(PASSWORD),
    state: UserState = UserState.ACTIVE,
) -> User:
    user = User(
        id=uuid.uuid4(),
        email=f"{uuid.uuid4().hex[:10]}@example.com",
        name="Dormant Or Not",
        password_hash=password_hash,
        roles=(),
        state=state,
        create_time=created,
        update_time=created,
        version=1,
        last_login_time=last_login,
    )
    uow.db.users[user.id] = user
    return user


async def test_the_job_disables_exactly_the_dormant_users_as_disable_user_does(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock, revoked: list[uuid.UUID]
) -> None:
    long_ago = START - timedelta(days=DAYS + 1)
    recently = START - timedelta(days=DAYS - 1)
    old_login = _stored(uow, created=long_ago, last_login=long_ago)
    never_logged_in = _stored(uow, created=long_ago)
    recent_login = _stored(uow, created=long_ago, last_login=recently)
    new_account = _stored(uow, created=recently)
    service_account = _stored(uow, created=long_ago, password_hash=SERVICE_ACCOUNT_PASSWORD_HASH)
    already_disabled = _stored(uow, created=long_ago, state=UserState.DISABLED)

    assert await service.disable_dormant_users(days=DAYS) == 2

    dormant = {old_login.id, never_logged_in.id}
    for user in (old_login, never_logged_in):
        after = uow.store[user.id]
        assert after.state is UserState.DISABLED
        assert after.token_version == user.token_version + 1
        assert after.version == user.version + 1
    for user in (recent_login, new_account, service_account, already_disabled):
        assert uow.store[user.id] == user
    # Refresh tokens revoked and this replica's token cache told, as DisableUser does.
    assert set(uow.db.refresh_tokens_revoked) == dormant
    assert set(revoked) == dormant
    events = [e for e in uow.audit if e.user_id in dormant]
    assert len(events) == 2
    for event in events:
        assert event.action == audit.USER_DISABLED
        assert event.actor == audit.SYSTEM_ACTOR == "system"
        assert event.changes == {
            "state": {"old": "active", "new": "disabled"},
            "reason": {"old": None, "new": "dormant"},
        }
        assert event.request_id.startswith("dormant-")
    # Nothing left to do: a second run disables nobody.
    assert await service.disable_dormant_users(days=DAYS) == 0


async def test_the_job_follows_the_clock(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    user = _stored(uow, created=START, last_login=START)
    assert await service.disable_dormant_users(days=DAYS) == 0
    clock.advance(timedelta(days=DAYS))
    assert await service.disable_dormant_users(days=DAYS) == 0  # exactly N days: not older
    clock.advance(timedelta(microseconds=1))
    assert await service.disable_dormant_users(days=DAYS) == 1
    assert uow.store[user.id].state is UserState.DISABLED


async def test_the_job_is_off_at_zero_days(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = _stored(uow, created=START - timedelta(days=10_000))
    assert await service.disable_dormant_users(days=0) == 0
    assert uow.store[user.id].state is UserState.ACTIVE


async def test_a_login_between_the_read_and_the_write_keeps_the_user_active(
    service: UserService, uow: FakeUnitOfWorkFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job reads candidates, then disables each under its row lock after checking again:
    a user that logged in meanwhile is skipped."""
    long_ago = START - timedelta(days=DAYS + 1)
    user = _stored(uow, created=long_ago, last_login=long_ago)
    stale = uow.store[user.id]
    # It logs in after the job read it.
    uow.db.users[user.id] = dataclasses.replace(stale, last_login_time=START)

    async def stale_read(self: object, *, cutoff: datetime, limit: int) -> Sequence[User]:
        return [stale]

    from tests.unit.fakes import FakeUserRepository

    monkeypatch.setattr(FakeUserRepository, "dormant", stale_read)
    assert await service.disable_dormant_users(days=DAYS) == 0
    assert uow.store[user.id].state is UserState.ACTIVE


async def test_the_job_works_in_bounded_batches(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    long_ago = START - timedelta(days=DAYS + 1)
    for _ in range(7):
        _stored(uow, created=long_ago)
    assert await service.disable_dormant_users(days=DAYS, batch_size=2, max_batches=2) == 4
    assert await service.disable_dormant_users(days=DAYS, batch_size=2, max_batches=2) == 3
    assert all(u.state is UserState.DISABLED for u in uow.store.values())
