"""Audit events on in-memory fakes: one per change, in its transaction, secrets redacted."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import START, UserServiceFactory
from tests.unit.fakes import (
    FakeAuditRepository,
    FakeClock,
    FakePasswordHasher,
    FakeUnitOfWorkFactory,
)
from usersvc.adapters.jwt_tokens import AccessTokenCodec, KeySet, generate_private_key_file
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.domain import audit
from usersvc.domain.audit import REDACTED, REDACTED_FIELDS, AuditEvent, redact
from usersvc.domain.auth import SYSTEM, Principal, RequestContext, TokenPair
from usersvc.domain.errors import (
    EmailTaken,
    EtagMismatch,
    FailedPrecondition,
    Unauthenticated,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.models import UserState, UserView
from usersvc.services.audit import AuditService
from usersvc.services.auth import AuthService, TokenStateCache, hash_refresh_token
from usersvc.services.users import UserService

ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new passphrase 42"
REQUEST_ID = "req-audit-1"


class ArgonLookingHasher(FakePasswordHasher):
    """Fast fake hashes that look like Argon2 ones and never need a rehash."""

    @staticmethod
    def hash_of(password: str) -> str:
        return "$argon2id$fake$" + FakePasswordHasher.hash_of(password)

    def needs_rehash(self, password_hash: str) -> bool:
        return False


class AuditFailure(Exception):
    """Injected into the audit repository."""


@pytest.fixture
def hasher() -> ArgonLookingHasher:
    return ArgonLookingHasher()


@pytest.fixture
def auth_service(
    uow: FakeUnitOfWorkFactory, hasher: ArgonLookingHasher, clock: FakeClock, tmp_path: Path
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
        max_failures=3,
        lock_seconds=60,
        clock=clock,
    )


@pytest.fixture
def failing_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(self: FakeAuditRepository, event: AuditEvent) -> None:
        raise AuditFailure("audit store is broken")

    monkeypatch.setattr(FakeAuditRepository, "add", fail)


async def _create(service: UserService, email: str = "alice@example.com") -> UserView:
    return await service.create_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
        email=email,
        name="Alice",
        password=PASSWORD,
    )


def _only_event(uow: FakeUnitOfWorkFactory, after: int) -> AuditEvent:
    """The one event committed since `after` events existed."""
    new = uow.audit[after:]
    assert len(new) == 1, [e.action for e in new]
    return new[0]


def _assert_no_secrets(event: AuditEvent, *secrets: str) -> None:
    text = repr(event) + json.dumps(event.changes)
    for secret in secrets:
        assert secret not in text
    assert "$argon2" not in text
    assert "fake-sha256" not in text


def _change(old: Any, new: Any) -> dict[str, Any]:
    return {"old": old, "new": new}


# --- the redaction list ----------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(REDACTED_FIELDS))
def test_every_field_on_the_redaction_list_is_redacted(field: str) -> None:
    assert redact({field: ("old secret", "new secret")}) == {field: _change(REDACTED, REDACTED)}


def test_the_redaction_list_covers_passwords_hashes_and_tokens() -> None:
    assert {
        "password",
        "password_hash",
        "new_password",
        "current_password",
        "access_token",
        "refresh_token",
        "token_hash",
    } <= REDACTED_FIELDS


def test_fields_off_the_redaction_list_keep_their_values() -> None:
    assert redact({"email": ("a@x.com", "b@x.com"), "roles": ([], ["admin"])}) == {
        "email": _change("a@x.com", "b@x.com"),
        "roles": _change([], ["admin"]),
    }


# --- one event per use case ------------------------------------------------------------------


async def test_create_writes_a_user_created_event(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    event = _only_event(uow, 0)
    assert event.action == audit.USER_CREATED
    assert event.user_id == user.id
    assert event.actor == str(ADMIN.user_id)
    assert event.request_id == REQUEST_ID
    assert event.create_time == START
    assert event.create_time.utcoffset() == timedelta(0)
    assert event.changes == {
        "email": _change(None, "alice@example.com"),
        "name": _change(None, "Alice"),
        "roles": _change(None, []),
        "state": _change(None, "active"),
        "password": _change(REDACTED, REDACTED),
    }
    _assert_no_secrets(event, PASSWORD, uow.store[user.id].password_hash)


async def test_create_by_operator_tooling_names_the_system_as_actor(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    await service.create_user(
        ctx=RequestContext(SYSTEM, request_id=REQUEST_ID),
        email="svc@service.invalid",
        name="svc",
        password=None,
        roles=["service"],
    )
    event = _only_event(uow, 0)
    assert event.actor == audit.SYSTEM_ACTOR == "system"
    assert event.changes["roles"] == _change(None, ["service"])


async def test_update_records_old_and_new_values_of_changed_fields_only(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock
) -> None:
    user = await _create(service)
    later = clock.advance(timedelta(minutes=1))
    await service.update_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
        user_id=str(user.id),
        paths=["name", "email"],
        email="alice@example.com",  # unchanged: not a change
        name="Alice Liddell",
        etag=user.etag,
    )
    event = _only_event(uow, 1)
    assert (event.action, event.user_id, event.create_time) == (
        audit.USER_UPDATED,
        user.id,
        later,
    )
    assert event.changes == {"name": _change("Alice", "Alice Liddell")}


async def test_self_update_names_the_user_as_actor(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    me = Principal(user_id=user.id, roles=frozenset())
    await service.update_user(
        ctx=RequestContext(me, request_id=REQUEST_ID),
        user_id=str(user.id),
        paths=["email"],
        email="NEW@example.com",
        name="",
        etag="",
    )
    event = _only_event(uow, 1)
    assert event.actor == str(user.id)
    assert event.changes == {"email": _change("alice@example.com", "new@example.com")}


async def test_a_change_of_roles_is_a_roles_changed_event(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await service.update_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
        user_id=str(user.id),
        paths=["roles", "name"],
        email="",
        name="Admin Alice",
        roles=["admin"],
        etag="",
    )
    event = _only_event(uow, 1)
    assert event.action == audit.USER_ROLES_CHANGED
    assert event.changes == {
        "roles": _change([], ["admin"]),
        "name": _change("Alice", "Admin Alice"),
    }


@pytest.mark.parametrize("by_admin", [True, False])
async def test_password_change_is_recorded_without_any_password_or_hash(
    service: UserService, uow: FakeUnitOfWorkFactory, by_admin: bool
) -> None:
    user = await _create(service)
    old_hash = uow.store[user.id].password_hash
    actor = ADMIN if by_admin else Principal(user_id=user.id, roles=frozenset())
    await service.change_password(
        ctx=RequestContext(actor, request_id=REQUEST_ID),
        user_id=str(user.id),
        current_password="" if by_admin else PASSWORD,
        new_password=NEW_PASSWORD,
        etag=user.etag,
    )
    event = _only_event(uow, 1)
    assert event.action == audit.USER_PASSWORD_CHANGED
    assert event.actor == str(actor.user_id)
    assert event.changes == {"password": _change(REDACTED, REDACTED)}
    new_hash = uow.store[user.id].password_hash
    _assert_no_secrets(event, PASSWORD, NEW_PASSWORD, old_hash, new_hash)


async def test_disable_and_enable_record_the_state_change(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await service.disable_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=""
    )
    disabled = _only_event(uow, 1)
    await service.enable_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=""
    )
    enabled = _only_event(uow, 2)
    assert (disabled.action, disabled.changes) == (
        audit.USER_DISABLED,
        {"state": _change("active", "disabled")},
    )
    assert (enabled.action, enabled.changes) == (
        audit.USER_ENABLED,
        {"state": _change("disabled", "active")},
    )


async def test_soft_delete_records_the_state_and_every_event_outlives_the_purge(
    service: UserService, uow: FakeUnitOfWorkFactory, codec: PageTokenCodec, clock: FakeClock
) -> None:
    user = await _create(service)
    clock.advance(timedelta(seconds=1))
    await service.disable_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=""
    )
    clock.advance(timedelta(seconds=1))
    deleted_at = clock()
    await service.delete_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id)
    )
    event = _only_event(uow, 2)
    assert (event.action, event.user_id, event.actor) == (
        audit.USER_DELETED,
        user.id,
        str(ADMIN.user_id),
    )
    assert event.changes == {
        "state": _change("disabled", "deleted"),
        "purge_time": _change(None, (deleted_at + timedelta(days=30)).isoformat()),
    }
    assert uow.store[user.id].state is UserState.DELETED
    clock.advance(timedelta(days=30))
    assert await service.purge_deleted_users() == 1
    assert uow.store == {}
    page = await AuditService(uow=uow, page_tokens=codec).list_events(
        page_size=0, page_token="", user_id=str(user.id)
    )
    assert [e.action for e in page.events] == [
        audit.USER_PURGED,
        audit.USER_DELETED,
        audit.USER_DISABLED,
        audit.USER_CREATED,
    ]


async def test_the_admin_path_of_operator_tooling_is_audited(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await service.add_roles(user_id=user.id, roles=["admin"])
    event = _only_event(uow, 1)
    assert (event.action, event.actor) == (audit.USER_ROLES_CHANGED, "system")
    assert event.changes == {"roles": _change([], ["admin"])}


# --- no event for what did not happen ---------------------------------------------------------


async def test_refused_changes_write_no_event(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    other = await _create(service, "bob@example.com")
    stale = user.etag
    await service.update_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
        user_id=str(user.id),
        paths=["name"],
        email="",
        name="Al",
        etag="",
    )
    before = list(uow.audit)
    with pytest.raises(EtagMismatch):
        await service.update_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=str(user.id),
            paths=["name"],
            email="",
            name="X y",
            etag=stale,
        )
    with pytest.raises(EtagMismatch):
        await service.delete_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=stale
        )
    with pytest.raises(EtagMismatch):
        await service.disable_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=stale
        )
    with pytest.raises(EtagMismatch):
        await service.change_password(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=str(user.id),
            current_password="",
            new_password=NEW_PASSWORD,
            etag=stale,
        )
    with pytest.raises(EmailTaken):
        await service.update_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=str(other.id),
            paths=["email"],
            email=user.email,
            name="",
            etag="",
        )
    with pytest.raises(EmailTaken):
        await _create(service, "ALICE@example.com")
    with pytest.raises(FailedPrecondition):
        await service.enable_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=""
        )
    with pytest.raises(UserNotFound):
        await service.delete_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(uuid.uuid4())
        )
    with pytest.raises(ValidationFailed):
        await service.change_password(
            ctx=RequestContext(Principal(user_id=user.id, roles=frozenset())),
            user_id=str(user.id),
            current_password="wrong current password",
            new_password=NEW_PASSWORD,
            etag="",
        )
    assert uow.audit == before


# --- a failing audit write undoes the change ---------------------------------------------------


@pytest.mark.usefixtures("failing_audit")
async def test_create_is_rolled_back_when_its_audit_event_cannot_be_written(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    with pytest.raises(AuditFailure):
        await service.create_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            email="carol@example.com",
            name="Carol",
            password=PASSWORD,
            request_id=str(uuid.uuid4()),
        )
    assert uow.store == {}
    assert uow.outbox == []
    assert uow.db.idempotency == {}
    assert uow.audit == []
    assert uow.last.rolled_back


async def _run_use_case(service: UserService, use_case: str, uid: str) -> None:
    if use_case == "update":
        await service.update_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=uid,
            paths=["name"],
            email="",
            name="Changed",
            etag="",
        )
    elif use_case == "roles":
        await service.update_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=uid,
            paths=["roles"],
            email="",
            name="",
            roles=["admin"],
            etag="",
        )
    elif use_case == "password":
        await service.change_password(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=uid,
            current_password="",
            new_password=NEW_PASSWORD,
            etag="",
        )
    elif use_case == "disable":
        await service.disable_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=uid, etag=""
        )
    else:
        await service.delete_user(ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=uid)


@pytest.mark.parametrize("use_case", ["update", "roles", "password", "disable", "delete"])
async def test_changes_are_rolled_back_when_their_audit_event_cannot_be_written(
    uow: FakeUnitOfWorkFactory,
    make_user_service: UserServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
    use_case: str,
) -> None:
    revoked: list[uuid.UUID] = []
    service = make_user_service(on_tokens_revoked=revoked.append)
    user = await _create(service)

    async def fail(self: FakeAuditRepository, event: AuditEvent) -> None:
        raise AuditFailure("audit store is broken")

    monkeypatch.setattr(FakeAuditRepository, "add", fail)
    with pytest.raises(AuditFailure):
        await _run_use_case(service, use_case, str(user.id))
    assert uow.views == {user.id: user}
    assert uow.db.refresh_tokens_revoked == []
    assert revoked == []  # no revocation hook for a change that did not happen
    assert [e.action for e in uow.audit] == [audit.USER_CREATED]
    assert uow.last.rolled_back


# --- logins ----------------------------------------------------------------------------------


async def _login(auth_service: AuthService, email: str, password: str) -> TokenPair:
    return await auth_service.login(email=email, password=password, request_id=REQUEST_ID)


async def test_successful_login_writes_an_event_without_password_hash_or_tokens(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    pair = await _login(auth_service, "  ALICE@example.com ", PASSWORD)
    event = _only_event(uow, 1)
    assert event.action == audit.LOGIN_SUCCEEDED
    assert event.user_id == user.id
    assert event.actor == audit.ANONYMOUS_ACTOR == "anonymous"
    assert event.request_id == REQUEST_ID
    assert event.create_time == START
    assert event.changes == {"email": _change(None, "alice@example.com")}
    _assert_no_secrets(
        event,
        PASSWORD,
        uow.store[user.id].password_hash,
        pair.access_token,
        pair.refresh_token,
        hash_refresh_token(pair.refresh_token),
    )
    # The event and the refresh token were committed together.
    assert hash_refresh_token(pair.refresh_token) in uow.db.refresh_tokens


@pytest.mark.parametrize(
    ("email", "password", "outcome"),
    [
        ("alice@example.com", "not the password at all", "wrong_password"),
        ("nobody@example.com", PASSWORD, "unknown_email"),
    ],
)
async def test_failed_login_writes_an_event_without_the_password(
    service: UserService,
    auth_service: AuthService,
    uow: FakeUnitOfWorkFactory,
    email: str,
    password: str,
    outcome: str,
) -> None:
    user = await _create(service)
    with pytest.raises(Unauthenticated):
        await _login(auth_service, email, password)
    event = _only_event(uow, 1)
    assert event.action == audit.LOGIN_FAILED
    assert event.user_id == (user.id if email == user.email else None)
    assert event.actor == "anonymous"
    assert event.request_id == REQUEST_ID
    assert event.changes == {"email": _change(None, email), "outcome": _change(None, outcome)}
    _assert_no_secrets(event, password, uow.store[user.id].password_hash)


async def test_failed_login_of_a_disabled_user_is_recorded(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await service.disable_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id), etag=""
    )
    with pytest.raises(Unauthenticated):
        await _login(auth_service, user.email, PASSWORD)
    event = _only_event(uow, 2)
    assert (event.action, event.user_id) == (audit.LOGIN_FAILED, user.id)
    assert event.changes["outcome"] == _change(None, "disabled")


async def test_failed_login_of_a_deleted_user_is_recorded_and_refused_alike(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    await service.delete_user(
        ctx=RequestContext(ADMIN, request_id=REQUEST_ID), user_id=str(user.id)
    )
    with pytest.raises(Unauthenticated) as refused:
        await _login(auth_service, user.email, PASSWORD)
    event = _only_event(uow, 2)
    assert (event.action, event.user_id) == (audit.LOGIN_FAILED, user.id)
    assert event.changes["outcome"] == _change(None, "deleted")
    with pytest.raises(Unauthenticated) as unknown:
        await _login(auth_service, "nobody@example.com", PASSWORD)
    assert str(refused.value) == str(unknown.value)


async def test_failed_login_counts_in_the_same_transaction_as_its_event(
    service: UserService, auth_service: AuthService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _create(service)
    with pytest.raises(Unauthenticated):
        await _login(auth_service, user.email, "not the password at all")
    assert uow.store[user.id].failed_login_count == 1
    assert [e.action for e in uow.audit] == [audit.USER_CREATED, audit.LOGIN_FAILED]


@pytest.mark.parametrize("succeed", [True, False])
async def test_login_changes_are_rolled_back_when_the_event_cannot_be_written(
    service: UserService,
    auth_service: AuthService,
    uow: FakeUnitOfWorkFactory,
    monkeypatch: pytest.MonkeyPatch,
    succeed: bool,
) -> None:
    user = await _create(service)

    async def fail(self: FakeAuditRepository, event: AuditEvent) -> None:
        raise AuditFailure("audit store is broken")

    monkeypatch.setattr(FakeAuditRepository, "add", fail)
    with pytest.raises(AuditFailure):
        await _login(auth_service, user.email, PASSWORD if succeed else "wrong password here")
    assert uow.db.refresh_tokens == {}  # no token issued
    assert uow.store[user.id].view() == user  # no failure counted
    assert [e.action for e in uow.audit] == [audit.USER_CREATED]


# --- reading the trail -----------------------------------------------------------------------


async def test_list_events_is_newest_first_and_pages_with_tokens_bound_to_the_filter(
    service: UserService, uow: FakeUnitOfWorkFactory, clock: FakeClock, codec: PageTokenCodec
) -> None:
    alice = await _create(service)
    bob = await _create(service, "bob@example.com")
    for n in range(4):
        clock.advance(timedelta(seconds=(n + 1) % 2))  # pairs share a time: id breaks ties
        await service.update_user(
            ctx=RequestContext(ADMIN, request_id=REQUEST_ID),
            user_id=str(alice.id),
            paths=["name"],
            email="",
            name=f"Al {n}",
            etag="",
        )
    events = AuditService(uow=uow, page_tokens=codec)
    seen: list[AuditEvent] = []
    token = ""
    while True:
        page = await events.list_events(page_size=2, page_token=token, user_id=str(alice.id))
        seen.extend(page.events)
        token = page.next_page_token
        if not token:
            break
    expected = sorted(
        (e for e in uow.audit if e.user_id == alice.id),
        key=lambda e: (e.create_time, e.id),
        reverse=True,
    )
    assert seen == expected
    assert len(seen) == 5
    assert seen[-1].action == audit.USER_CREATED
    first = await events.list_events(page_size=1, page_token="", user_id=str(alice.id))
    with pytest.raises(ValidationFailed) as err:
        await events.list_events(page_size=1, page_token=first.next_page_token, user_id=str(bob.id))
    assert [v.field for v in err.value.violations] == ["page_token"]
