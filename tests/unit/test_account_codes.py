"""Mailed one-time codes (e-mail verification, password recovery) on in-memory fakes: the
rules, and what each step writes."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

import pytest

from tests.unit.conftest import START
from tests.unit.fakes import FakeClock, FakePasswordHasher, FakeUnitOfWorkFactory
from usersvc.domain import audit, user_events
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import (
    FailedPrecondition,
    InvalidCode,
    PermissionDenied,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_EMAIL_VERIFICATION, TOPIC_PASSWORD_RECOVERY
from usersvc.domain.models import UserView
from usersvc.services.account_codes import AccountCodeService
from usersvc.services.ports import PasswordHasher
from usersvc.services.users import UserService

ADMIN = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"})), "req-1")
PASSWORD = "correct horse battery staple"
TTL = timedelta(hours=24)
RECOVERY_TTL = timedelta(hours=1)
NEW_PASSWORD = "a brand new passphrase"


REVOKED: list[uuid.UUID] = []


@pytest.fixture
def codes(
    uow: FakeUnitOfWorkFactory, clock: FakeClock, hasher: PasswordHasher, service: UserService
) -> AccountCodeService:
    REVOKED.clear()
    return AccountCodeService(
        uow=uow,
        hasher=hasher,
        clock=clock,
        verification_ttl=TTL,
        recovery_ttl=RECOVERY_TTL,
        max_attempts=3,
        check_new_password=service.check_new_password,
        on_tokens_revoked=REVOKED.append,
    )


async def _user(service: UserService) -> UserView:
    return await service.create_user(
        ctx=ADMIN, email=f"{uuid.uuid4().hex[:8]}@example.com", name="Ada", password=PASSWORD
    )


def _mailed_code(
    uow: FakeUnitOfWorkFactory, user: UserView, topic: str = TOPIC_EMAIL_VERIFICATION
) -> str:
    """The code of the newest mail of `topic` to `user` (the only place it exists)."""
    [*_, message] = [m for m in uow.outbox if m.topic == topic and m.aggregate_id == user.id]
    code = message.payload["code"]
    assert isinstance(code, str)
    return code


async def test_a_mailed_code_verifies_the_address_once(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    expires = await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    assert expires == START + TTL
    code = _mailed_code(uow, user)
    [message] = [m for m in uow.outbox if m.topic == TOPIC_EMAIL_VERIFICATION]
    assert message.payload["email"] == user.email
    assert message.request_id == "req-1"
    # Only the hash is stored.
    [stored] = uow.db.one_time_codes.values()
    assert code not in repr(stored)

    await codes.verify_email(request_id="req-2", user_id=str(user.id), code=code)

    after = uow.views[user.id]
    assert after.email_verified
    assert after.version == user.version + 1
    assert uow.audit[-1].action == audit.USER_EMAIL_VERIFIED
    assert uow.audit[-1].actor == audit.ANONYMOUS_ACTOR
    assert uow.user_events[-1].changed_fields == ("email_verified",)
    assert uow.user_events[-1].type == user_events.UPDATED
    # No record of the flow holds the code.
    assert code not in repr(uow.audit) + repr(uow.user_events)
    with pytest.raises(InvalidCode):
        await codes.verify_email(request_id="req-3", user_id=str(user.id), code=code)
    # Verified now: nothing more to send.
    with pytest.raises(FailedPrecondition) as refused:
        await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    assert refused.value.reason == "EMAIL_ALREADY_VERIFIED"


async def test_every_kind_of_bad_code_gets_the_same_answer(
    service: UserService,
    codes: AccountCodeService,
    uow: FakeUnitOfWorkFactory,
    clock: FakeClock,
) -> None:
    user = await _user(service)
    await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    first = _mailed_code(uow, user)
    await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    latest = _mailed_code(uow, user)
    answers = []
    for user_id, code in (
        (str(user.id), first),  # superseded
        (str(uuid.uuid4()), latest),  # no such user
        (str(user.id), "x" * 43),  # wrong
    ):
        with pytest.raises(InvalidCode) as refused:
            await codes.verify_email(request_id="-", user_id=user_id, code=code)
        answers.append((refused.value.message, refused.value.violations))
    assert len(set(map(repr, answers))) == 1
    clock.advance(TTL)
    with pytest.raises(InvalidCode):  # expired
        await codes.verify_email(request_id="-", user_id=str(user.id), code=latest)
    assert not uow.views[user.id].email_verified


async def test_wrong_codes_burn_the_outstanding_one(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    code = _mailed_code(uow, user)
    for _ in range(3):
        with pytest.raises(InvalidCode):
            await codes.verify_email(request_id="-", user_id=str(user.id), code="wrong")
    with pytest.raises(InvalidCode):
        await codes.verify_email(request_id="-", user_id=str(user.id), code=code)


async def test_changing_the_email_unverifies_it_and_kills_the_codes_for_the_old_one(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    await codes.verify_email(request_id="-", user_id=str(user.id), code=_mailed_code(uow, user))
    changed = await service.update_user(
        ctx=ADMIN,
        user_id=str(user.id),
        paths=["email"],
        email=f"new-{user.email}",
        name="",
        etag="",
    )
    assert not changed.email_verified
    assert uow.user_events[-1].changed_fields == ("email", "email_verified")
    assert uow.audit[-1].changes["email_verified"] == {"old": True, "new": False}

    # A code mailed before a change of address does not verify the new one.
    await codes.send_verification_email(ctx=ADMIN, user_id=str(user.id))
    stale = _mailed_code(uow, changed)
    await service.update_user(
        ctx=ADMIN,
        user_id=str(user.id),
        paths=["email"],
        email=f"newer-{user.email}",
        name="",
        etag="",
    )
    with pytest.raises(InvalidCode):
        await codes.verify_email(request_id="-", user_id=str(user.id), code=stale)


async def test_a_password_change_ends_the_recovery_codes_mailed_before_it(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    pending = _mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY)
    owner = RequestContext(Principal(user_id=user.id, roles=frozenset({"user"})), "req-2")
    await service.change_password(
        ctx=owner,
        user_id=str(user.id),
        current_password=PASSWORD,
        new_password=NEW_PASSWORD,
        etag="",
    )
    # Otherwise the older code would set the password again, over the one just chosen.
    with pytest.raises(InvalidCode):
        await codes.recover_password(
            request_id="-", user_id=str(user.id), code=pending, new_password="another passphrase"
        )
    # A code asked for after the change works as usual.
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    await codes.recover_password(
        request_id="-",
        user_id=str(user.id),
        code=_mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY),
        new_password="another passphrase",
    )


async def test_bad_input_and_unknown_users(codes: AccountCodeService) -> None:
    with pytest.raises(ValidationFailed) as bad:
        await codes.verify_email(request_id="-", user_id="nope", code="")
    assert [(v.field, v.reason) for v in bad.value.violations] == [
        ("user_id", "INVALID_FORMAT"),
        ("code", "REQUIRED"),
    ]
    with pytest.raises(ValidationFailed) as long:
        await codes.verify_email(request_id="-", user_id=str(uuid.uuid4()), code="x" * 65)
    assert [(v.field, v.reason) for v in long.value.violations] == [("code", "TOO_LONG")]
    with pytest.raises(UserNotFound):
        await codes.send_verification_email(ctx=ADMIN, user_id=str(uuid.uuid4()))


async def test_a_recovery_code_sets_a_new_password_once_and_ends_every_session(
    service: UserService,
    codes: AccountCodeService,
    uow: FakeUnitOfWorkFactory,
    clock: FakeClock,
) -> None:
    user = await _user(service)
    # A lock and failures from someone guessing: recovery clears them.
    stored = uow.db.users[user.id]
    uow.db.users[user.id] = dataclasses.replace(
        stored, failed_login_count=10, locked_until=START + timedelta(minutes=15)
    )
    expires = await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    assert expires == START + RECOVERY_TTL
    code = _mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY)
    assert uow.audit[-1].action == audit.USER_RECOVERY_CODE_CREATED
    assert uow.audit[-1].actor == str(ADMIN.actor.user_id)
    clock.advance(timedelta(minutes=5))

    await codes.recover_password(
        request_id="req-r", user_id=str(user.id), code=code, new_password=NEW_PASSWORD
    )

    after = uow.store[user.id]
    assert after.password_hash == FakePasswordHasher.hash_of(NEW_PASSWORD)
    assert after.token_version == stored.token_version + 1
    assert (after.failed_login_count, after.locked_until) == (0, None)
    assert after.password_change_time == clock.now
    assert uow.db.refresh_tokens_revoked[-1] == user.id
    assert [user.id] == REVOKED
    [event] = [e for e in uow.audit if e.action == audit.USER_PASSWORD_RECOVERED]
    assert event.actor == audit.ANONYMOUS_ACTOR and event.request_id == "req-r"
    assert event.changes["password"] == {"old": "[REDACTED]", "new": "[REDACTED]"}
    assert event.changes["failed_login_count"] == {"old": 10, "new": 0}
    assert uow.user_events[-1].type == user_events.PASSWORD_CHANGED
    assert uow.user_events[-1].changed_fields == ("failed_login_count", "locked_until", "password")
    assert code not in repr(uow.audit) + repr(uow.user_events)
    assert NEW_PASSWORD not in repr(uow.audit) + repr(uow.user_events)
    with pytest.raises(InvalidCode):
        await codes.recover_password(
            request_id="-", user_id=str(user.id), code=code, new_password="yet another one!"
        )


async def test_a_bad_new_password_leaves_the_code_usable(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    code = _mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY)
    with pytest.raises(ValidationFailed) as bad:
        await codes.recover_password(
            request_id="-", user_id=str(user.id), code=code, new_password="short"
        )
    assert [v.field for v in bad.value.violations] == ["new_password"]
    await codes.recover_password(
        request_id="-", user_id=str(user.id), code=code, new_password=NEW_PASSWORD
    )


async def test_disabled_or_deleted_users_cannot_recover(
    service: UserService, codes: AccountCodeService, uow: FakeUnitOfWorkFactory
) -> None:
    user = await _user(service)
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    code = _mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY)
    await service.disable_user(ctx=ADMIN, user_id=str(user.id), etag="")
    with pytest.raises(FailedPrecondition) as refused:
        await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    assert refused.value.reason == "USER_DISABLED"
    with pytest.raises(InvalidCode):
        await codes.recover_password(
            request_id="-", user_id=str(user.id), code=code, new_password=NEW_PASSWORD
        )
    other = await _user(service)
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(other.id))
    code = _mailed_code(uow, other, TOPIC_PASSWORD_RECOVERY)
    await service.delete_user(ctx=ADMIN, user_id=str(other.id))
    with pytest.raises(UserNotFound):
        await codes.create_recovery_code(ctx=ADMIN, user_id=str(other.id))
    with pytest.raises(InvalidCode):
        await codes.recover_password(
            request_id="-", user_id=str(other.id), code=code, new_password=NEW_PASSWORD
        )
    assert uow.store[other.id].password_hash == FakePasswordHasher.hash_of(PASSWORD)


async def test_password_change_required_is_for_admins_and_cleared_by_the_users_own_change(
    service: UserService, uow: FakeUnitOfWorkFactory, codes: AccountCodeService
) -> None:
    service_ctx = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"})))
    with pytest.raises(PermissionDenied):
        await service.create_user(
            ctx=service_ctx,
            email="pcr-by-service@example.com",
            name="Ada",
            password=PASSWORD,
            password_change_required=True,
        )
    user = await service.create_user(
        ctx=ADMIN,
        email="pcr@example.com",
        name="Ada",
        password=PASSWORD,
        password_change_required=True,
    )
    assert user.password_change_required
    assert uow.audit[-1].changes["password_change_required"] == {"old": None, "new": True}
    own = RequestContext(Principal(user_id=user.id, roles=frozenset()))
    with pytest.raises(PermissionDenied):
        await service.update_user(
            ctx=own,
            user_id=str(user.id),
            paths=["password_change_required"],
            email="",
            name="",
            etag="",
            password_change_required=False,
        )
    # An admin setting a password leaves the flag: a temporary password is what it is for.
    await service.change_password(
        ctx=ADMIN, user_id=str(user.id), current_password="", new_password=NEW_PASSWORD, etag=""
    )
    assert uow.views[user.id].password_change_required
    changed = await service.change_password(
        ctx=own,
        user_id=str(user.id),
        current_password=NEW_PASSWORD,
        new_password="the users own choice",
        etag="",
    )
    assert not changed.password_change_required
    assert uow.user_events[-1].changed_fields == ("password", "password_change_required")

    # Setting it again revokes the user's tokens; clearing it does not.
    before = uow.store[user.id].token_version
    await service.update_user(
        ctx=ADMIN,
        user_id=str(user.id),
        paths=["password_change_required"],
        email="",
        name="",
        etag="",
        password_change_required=True,
    )
    assert uow.store[user.id].token_version == before + 1
    await service.update_user(
        ctx=ADMIN,
        user_id=str(user.id),
        paths=["password_change_required"],
        email="",
        name="",
        etag="",
        password_change_required=False,
    )
    assert uow.store[user.id].token_version == before + 1
    assert not uow.views[user.id].password_change_required

    # A recovery clears it too.
    await service.update_user(
        ctx=ADMIN,
        user_id=str(user.id),
        paths=["password_change_required"],
        email="",
        name="",
        etag="",
        password_change_required=True,
    )
    await codes.create_recovery_code(ctx=ADMIN, user_id=str(user.id))
    code = _mailed_code(uow, user, TOPIC_PASSWORD_RECOVERY)
    await codes.recover_password(
        request_id="-", user_id=str(user.id), code=code, new_password="recovered at last"
    )
    assert not uow.views[user.id].password_change_required
