"""Use cases of mailed one-time codes: e-mail verification and password recovery.

A code is made here, mailed through the outbox in the transaction that stores its hash, and
redeemed once. The code never leaves this module except in the outbox payload: not in a
return value, a log line, an audit record, an error or a change-feed event.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from usersvc.domain import audit
from usersvc.domain.audit import change_event
from usersvc.domain.auth import RequestContext
from usersvc.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidCode,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.events import (
    TOPIC_EMAIL_VERIFICATION,
    TOPIC_PASSWORD_RECOVERY,
    OutboxMessage,
)
from usersvc.domain.models import User, UserState
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
from usersvc.services.ports import Clock, PasswordHasher, UnitOfWork, UnitOfWorkFactory
from usersvc.services.transactions import in_transaction

log = logging.getLogger(__name__)

# The mail of each purpose.
_TOPIC = {
    CodePurpose.VERIFY_EMAIL: TOPIC_EMAIL_VERIFICATION,
    CodePurpose.RECOVER_PASSWORD: TOPIC_PASSWORD_RECOVERY,
}


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


def _no_password_rules(password: str, field: str) -> FieldViolation | None:
    return None


def _no_revocation_hook(user_id: uuid.UUID) -> None:
    return None


class AccountCodeService:
    """Sends and redeems mailed one-time codes: e-mail verification, password recovery."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        clock: Clock = utc_now,
        verification_ttl: timedelta = timedelta(hours=24),
        recovery_ttl: timedelta = timedelta(hours=1),
        max_attempts: int = 5,
        check_new_password: Callable[[str, str], FieldViolation | None] = _no_password_rules,
        on_tokens_revoked: Callable[[uuid.UUID], None] = _no_revocation_hook,
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self._clock = clock
        self._ttl = {
            CodePurpose.VERIFY_EMAIL: verification_ttl,
            CodePurpose.RECOVER_PASSWORD: recovery_ttl,
        }
        self._max_attempts = max_attempts
        # The password rules of CreateUser and ChangePassword (length, common passwords).
        self._check_new_password = check_new_password
        self._on_tokens_revoked = on_tokens_revoked

    async def send_verification_email(self, *, ctx: RequestContext, user_id: str) -> datetime:
        """Mail a new verification code to the user's current address; returns its expiry.

        Earlier unused codes stop working. UserNotFound for an unknown or soft-deleted user;
        FailedPrecondition (EMAIL_ALREADY_VERIFIED) when there is nothing to verify.
        """

        def check(user: User) -> None:
            if user.email_verified:
                raise FailedPrecondition(
                    "the e-mail address is already verified", reason="EMAIL_ALREADY_VERIFIED"
                )

        return await self._send(
            ctx,
            _require_user_id(user_id, "user_id"),
            CodePurpose.VERIFY_EMAIL,
            check,
            audit.USER_VERIFICATION_EMAIL_SENT,
        )

    async def create_recovery_code(self, *, ctx: RequestContext, user_id: str) -> datetime:
        """Mail a password recovery code to the user's current address (admins); returns its
        expiry, never the code. Earlier unused recovery codes stop working. UserNotFound for
        an unknown or soft-deleted user; FailedPrecondition (USER_DISABLED) for a disabled
        one, which could not use it."""

        def check(user: User) -> None:
            if user.state is not UserState.ACTIVE:
                raise FailedPrecondition(
                    "a disabled user cannot recover its password; enable it first",
                    reason="USER_DISABLED",
                )

        return await self._send(
            ctx,
            _require_user_id(user_id, "user_id"),
            CodePurpose.RECOVER_PASSWORD,
            check,
            audit.USER_RECOVERY_CODE_CREATED,
        )

    async def _send(
        self,
        ctx: RequestContext,
        uid: uuid.UUID,
        purpose: CodePurpose,
        check: Callable[[User], None],
        action: str,
    ) -> datetime:
        code = new_code()

        async def send(uow: UnitOfWork) -> datetime:
            # Locked: a concurrent change of the e-mail cannot slip between read and insert.
            user = await uow.users.get(uid, for_update=True)
            if user is None or user.state is UserState.DELETED:
                raise UserNotFound(str(uid))
            check(user)
            now = self._clock()
            expires = now + self._ttl[purpose]
            await uow.one_time_codes.supersede(uid, purpose, now=now)
            await uow.one_time_codes.add(
                OneTimeCode(
                    user_id=uid,
                    purpose=purpose,
                    code_hash=hash_code(code),
                    email=user.email,
                    create_time=now,
                    expire_time=expires,
                )
            )
            await uow.outbox.add(
                OutboxMessage(
                    topic=_TOPIC[purpose],
                    aggregate_id=uid,
                    # The one place the code is written down, besides the mail itself.
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
                change_event(
                    user_id=uid,
                    action=action,
                    changes={
                        "email": (None, user.email),
                        "expire_time": (None, expires.isoformat()),
                    },
                    actor=ctx.actor.audit_name,
                    request_id=ctx.request_id,
                    now=now,
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

        async def apply(uow: UnitOfWork, user: User, now: datetime) -> bool:
            if user.email_verified:
                return False  # verified meanwhile by another code: nothing changes
            updated = await uow.users.update(
                user.id,
                {"email_verified": True, "update_time": now},
                expected_version=user.version,
            )
            if updated is None:
                return False  # guard only: the row is locked
            await uow.user_events.add(
                change_of(
                    audit.USER_EMAIL_VERIFIED, updated.view(), ["email_verified"], request_id, now
                )
            )
            await uow.audit.add(
                change_event(
                    user_id=user.id,
                    action=audit.USER_EMAIL_VERIFIED,
                    changes={"email_verified": (False, True), "email": (None, user.email)},
                    actor=audit.ANONYMOUS_ACTOR,
                    request_id=request_id,
                    now=now,
                )
            )
            return False

        await self._redeem(uid, CodePurpose.VERIFY_EMAIL, code, apply)

    async def recover_password(
        self, *, request_id: str, user_id: str, code: str, new_password: str
    ) -> None:
        """Set a new password with a recovery code: the code is used up, the password set,
        the user's tokens revoked, the login lock cleared, audited (by "anonymous") and a
        feed event written, in one transaction. InvalidCode for every kind of failure,
        including an unknown, disabled or deleted user."""
        uid, id_violation = parse_user_id(user_id, "user_id")
        violations = [
            v
            for v in (
                id_violation,
                check_code(code),
                self._check_new_password(new_password, "new_password"),
            )
            if v is not None
        ]
        if violations or uid is None:
            raise ValidationFailed(violations)
        # Hashed first, off the event loop: the same work whether or not the user exists or
        # the code is right, and no hashing inside the transaction.
        password_hash = await self._hasher.hash(new_password)

        async def apply(uow: UnitOfWork, user: User, now: datetime) -> bool:
            values: dict[str, Any] = {
                "password_hash": password_hash,
                "password_change_time": now,
                "update_time": now,
                "failed_login_count": 0,
                "locked_until": None,
                "password_change_required": False,
            }
            updated = await uow.users.update(
                user.id, values, expected_version=user.version, revoke_tokens=True
            )
            if updated is None:
                return False  # guard only: the row is locked
            await uow.refresh_tokens.revoke_user(user.id)
            changes: dict[str, tuple[Any, Any]] = {"password": ("[set]", "[changed]")}
            if user.failed_login_count:
                changes["failed_login_count"] = (user.failed_login_count, 0)
            if user.locked_until is not None:
                changes["locked_until"] = (user.locked_until.isoformat(), None)
            if user.password_change_required:
                changes["password_change_required"] = (True, False)
            await uow.user_events.add(
                change_of(
                    audit.USER_PASSWORD_RECOVERED, updated.view(), list(changes), request_id, now
                )
            )
            await uow.audit.add(
                change_event(
                    user_id=user.id,
                    action=audit.USER_PASSWORD_RECOVERED,
                    changes=changes,
                    actor=audit.ANONYMOUS_ACTOR,
                    request_id=request_id,
                    now=now,
                )
            )
            return True

        await self._redeem(uid, CodePurpose.RECOVER_PASSWORD, code, apply)

    async def _redeem(
        self,
        uid: uuid.UUID,
        purpose: CodePurpose,
        code: str,
        apply: Callable[[UnitOfWork, User, datetime], Awaitable[bool]],
    ) -> None:
        """Use up the code and `apply` its effect in one transaction, or raise InvalidCode.
        `apply` says whether the user's tokens were revoked."""
        code_hash = hash_code(code)
        # Recovery is for active users only; verification for any user not deleted.
        usable = (
            {UserState.ACTIVE}
            if purpose is CodePurpose.RECOVER_PASSWORD
            else {UserState.ACTIVE, UserState.DISABLED}
        )

        async def redeem(uow: UnitOfWork) -> tuple[bool, bool]:
            now = self._clock()
            user = await uow.users.get(uid, for_update=True)
            if user is None or user.state not in usable:
                return False, False
            redeemed = await uow.one_time_codes.redeem(
                uid, purpose, code_hash, now=now, max_attempts=self._max_attempts
            )
            if redeemed is None:
                await uow.one_time_codes.record_failure(
                    uid, purpose, now=now, max_attempts=self._max_attempts
                )
                await uow.commit()
                return False, False
            if redeemed.email != user.email:
                # Mailed to an address the user no longer has: used up, does nothing.
                await uow.commit()
                return False, False
            revoked = await apply(uow, user, now)
            await uow.commit()
            return True, revoked

        done, revoked = await in_transaction(self._uow, redeem)
        if revoked:
            self._on_tokens_revoked(uid)
        if not done:
            log.info("one-time code refused", extra={"user_id": str(uid), "purpose": purpose})
            raise InvalidCode()
