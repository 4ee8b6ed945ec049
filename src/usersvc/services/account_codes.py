"""Use cases of mailed one-time codes: e-mail verification.

A code is made here, mailed through the outbox in the transaction that stores its hash, and
redeemed once. The code never leaves this module except in the outbox payload: not in a
return value, a log line, an audit record, an error or a change-feed event.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from usersvc.domain import audit
from usersvc.domain.audit import AuditEvent, redact
from usersvc.domain.auth import RequestContext
from usersvc.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidCode,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_EMAIL_VERIFICATION, OutboxMessage
from usersvc.domain.models import UserState
from usersvc.domain.one_time_codes import (
    CODE_MAX_CHARS,
    CodePurpose,
    OneTimeCode,
    hash_code,
    new_code,
)
from usersvc.domain.user_events import change_of
from usersvc.domain.validation import parse_user_id
from usersvc.services.clock import utc_now
from usersvc.services.ports import Clock, UnitOfWork, UnitOfWorkFactory
from usersvc.services.transactions import in_transaction

log = logging.getLogger(__name__)


def _require_user_id(raw: str, field: str) -> uuid.UUID:
    user_id, violation = parse_user_id(raw, field)
    if violation is not None or user_id is None:
        raise ValidationFailed([violation or FieldViolation(field, "id must be a UUID")])
    return user_id


def check_code(code: str) -> FieldViolation | None:
    """The shape of a code only (present, bounded); whether it works is the store's answer."""
    if not code:
        return FieldViolation("code", "code is required", "REQUIRED")
    if len(code) > CODE_MAX_CHARS:
        return FieldViolation(
            "code", f"code must be at most {CODE_MAX_CHARS} characters", "TOO_LONG"
        )
    return None


class AccountCodeService:
    """Sends and redeems e-mail verification codes."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        clock: Clock = utc_now,
        verification_ttl: timedelta = timedelta(hours=24),
        max_attempts: int = 5,
    ) -> None:
        self._uow = uow
        self._clock = clock
        self._verification_ttl = verification_ttl
        self._max_attempts = max_attempts

    async def send_verification_email(self, *, ctx: RequestContext, user_id: str) -> datetime:
        """Mail a new verification code to the user's current address; returns its expiry.

        Earlier unused codes stop working. UserNotFound for an unknown or soft-deleted user;
        FailedPrecondition (EMAIL_ALREADY_VERIFIED) when there is nothing to verify.
        """
        uid = _require_user_id(user_id, "user_id")
        code = new_code()

        async def send(uow: UnitOfWork) -> datetime:
            # Locked: a concurrent change of the e-mail cannot slip between read and insert.
            user = await uow.users.get(uid, for_update=True)
            if user is None or user.state is UserState.DELETED:
                raise UserNotFound(str(uid))
            if user.email_verified:
                raise FailedPrecondition(
                    "the e-mail address is already verified", reason="EMAIL_ALREADY_VERIFIED"
                )
            now = self._clock()
            expires = now + self._verification_ttl
            await uow.one_time_codes.supersede(uid, CodePurpose.VERIFY_EMAIL, now=now)
            await uow.one_time_codes.add(
                OneTimeCode(
                    user_id=uid,
                    purpose=CodePurpose.VERIFY_EMAIL,
                    code_hash=hash_code(code),
                    email=user.email,
                    create_time=now,
                    expire_time=expires,
                )
            )
            await uow.outbox.add(
                OutboxMessage(
                    topic=TOPIC_EMAIL_VERIFICATION,
                    aggregate_id=uid,
                    payload={
                        "user_id": str(uid),
                        "email": user.email,
                        "code": code,
                        "expire_time": expires.isoformat(),
                    },
                    request_id=ctx.request_id,
                    create_time=now,
                )
            )
            await uow.audit.add(
                _event(
                    ctx.actor.audit_name,
                    ctx.request_id,
                    uid,
                    audit.USER_VERIFICATION_EMAIL_SENT,
                    {"email": (None, user.email), "expire_time": (None, expires.isoformat())},
                    now,
                )
            )
            await uow.commit()
            return expires

        return await in_transaction(self._uow, send)

    async def verify_email(self, *, request_id: str, user_id: str, code: str) -> None:
        """Redeem a verification code: email_verified becomes true (new version, audit record
        by "anonymous", feed event). No caller is authenticated: the code is the proof.
        InvalidCode for every kind of failure, including an unknown user; a wrong code counts
        toward burning the user's outstanding one."""
        uid, id_violation = parse_user_id(user_id, "user_id")
        violations = [v for v in (id_violation, check_code(code)) if v is not None]
        if violations or uid is None:
            raise ValidationFailed(violations)
        code_hash = hash_code(code)

        async def verify(uow: UnitOfWork) -> bool:
            now = self._clock()
            user = await uow.users.get(uid, for_update=True)
            if user is None or user.state is UserState.DELETED:
                return False
            redeemed = await uow.one_time_codes.redeem(
                uid,
                CodePurpose.VERIFY_EMAIL,
                code_hash,
                now=now,
                max_attempts=self._max_attempts,
            )
            if redeemed is None:
                await uow.one_time_codes.record_failure(
                    uid, CodePurpose.VERIFY_EMAIL, now=now, max_attempts=self._max_attempts
                )
                await uow.commit()
                return False
            if redeemed.email != user.email:
                # Mailed to an address the user no longer has: used up, verifies nothing.
                await uow.commit()
                return False
            if not user.email_verified:
                updated = await uow.users.update(
                    uid,
                    {"email_verified": True, "update_time": now},
                    expected_version=user.version,
                )
                if updated is None:
                    return False  # guard only: the row is locked
                await uow.user_events.add(
                    change_of(
                        audit.USER_EMAIL_VERIFIED,
                        updated.view(),
                        ["email_verified"],
                        request_id,
                        now,
                    )
                )
                await uow.audit.add(
                    _event(
                        audit.ANONYMOUS_ACTOR,
                        request_id,
                        uid,
                        audit.USER_EMAIL_VERIFIED,
                        {"email_verified": (False, True), "email": (None, user.email)},
                        now,
                    )
                )
            await uow.commit()
            return True

        if not await in_transaction(self._uow, verify):
            log.info("verification code refused", extra={"user_id": str(uid)})
            raise InvalidCode()


def _event(
    actor: str,
    request_id: str,
    user_id: uuid.UUID,
    action: str,
    changes: dict[str, tuple[object, object]],
    now: datetime,
) -> AuditEvent:
    return AuditEvent(
        user_id=user_id,
        action=action,
        changes=redact(changes),
        actor=actor,
        request_id=request_id,
        create_time=now,
    )
