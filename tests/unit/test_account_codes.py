"""E-mail verification codes on in-memory fakes: the rules, and what each step writes."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from tests.unit.conftest import START
from tests.unit.fakes import FakeClock, FakeUnitOfWorkFactory
from usersvc.domain import audit, user_events
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import (
    FailedPrecondition,
    InvalidCode,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_EMAIL_VERIFICATION
from usersvc.domain.models import UserView
from usersvc.services.account_codes import AccountCodeService
from usersvc.services.users import UserService

ADMIN = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"})), "req-1")
PASSWORD = "correct horse battery staple"
TTL = timedelta(hours=24)


@pytest.fixture
def codes(uow: FakeUnitOfWorkFactory, clock: FakeClock) -> AccountCodeService:
    return AccountCodeService(uow=uow, clock=clock, verification_ttl=TTL, max_attempts=3)


async def _user(service: UserService) -> UserView:
    return await service.create_user(
        ctx=ADMIN, email=f"{uuid.uuid4().hex[:8]}@example.com", name="Ada", password=PASSWORD
    )


def _mailed_code(uow: FakeUnitOfWorkFactory, user: UserView) -> str:
    """The code of the newest verification mail to `user` (the only place it exists)."""
    [*_, message] = [
        m for m in uow.outbox if m.topic == TOPIC_EMAIL_VERIFICATION and m.aggregate_id == user.id
    ]
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
