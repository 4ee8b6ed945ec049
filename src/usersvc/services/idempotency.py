"""Idempotent CreateUser (AIP-155): a retry with the same request_id answers as the first call."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from usersvc.domain import errors
from usersvc.domain.errors import DomainError, FieldViolation, ValidationFailed
from usersvc.domain.models import EntryOutcome, UserView
from usersvc.domain.user_json import user_from_json, user_to_json
from usersvc.services.ports import Clock, UnitOfWork, UnitOfWorkFactory
from usersvc.services.transactions import in_transaction


class IdempotentCreates:
    """Remembers created users by (caller, request_id) for `ttl_seconds`, with a keyed
    fingerprint of the request, so the same key with another payload is refused."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        clock: Clock,
        fingerprint_key: bytes,
        ttl_seconds: int,
    ) -> None:
        self._uow = uow
        self._clock = clock
        self._fingerprint_key = fingerprint_key
        self._ttl = timedelta(seconds=ttl_seconds)

    def fingerprint(
        self,
        email: str,
        name: str,
        password: str | None,
        roles: tuple[str, ...],
        *,
        labels: Mapping[str, str] | None = None,
        admin_metadata: Mapping[str, Any] | None = None,
        password_change_required: bool = False,
    ) -> str:
        # Keyed, so the stored value reveals nothing about the password without the key.
        fields: list[Any] = [email, name, password, list(roles)]
        if labels or admin_metadata:
            # Only when set: keys remembered before these fields existed keep their fingerprint.
            fields.append([dict(labels or {}), dict(admin_metadata or {})])
        if password_change_required:
            # The same: the flag only when set.
            fields.append(True)
        payload = json.dumps(fields, ensure_ascii=False, sort_keys=True)
        return hmac.new(self._fingerprint_key, payload.encode(), hashlib.sha256).hexdigest()

    def batch_fingerprint(self, all_or_nothing: bool, entries: list[list[Any]]) -> str:
        """Of a whole BatchCreateUsers request; never equal to a CreateUser fingerprint."""
        payload = json.dumps(["batch", all_or_nothing, entries], ensure_ascii=False, sort_keys=True)
        return hmac.new(self._fingerprint_key, payload.encode(), hashlib.sha256).hexdigest()

    async def remembered(self, caller: str, request_id: str, fingerprint: str) -> UserView | None:
        """The user an earlier call with this key created, or None (unknown or expired);
        ValidationFailed (REQUEST_ID_REUSED) when the key came with another payload."""
        result = await self._result(caller, request_id, fingerprint)
        return user_from_json(result) if result is not None else None

    async def remembered_batch(
        self, caller: str, request_id: str, fingerprint: str
    ) -> list[EntryOutcome] | None:
        """The outcomes of an earlier batch with this key, like `remembered`."""
        result = await self._result(caller, request_id, fingerprint)
        if result is None:
            return None
        return [
            EntryOutcome(user=user_from_json(o["user"]))
            if "user" in o
            else EntryOutcome(error=_error_from(o["error"]))
            for o in result["batch"]
        ]

    async def remember_batch(
        self,
        uow: UnitOfWork,
        *,
        caller: str,
        request_id: str,
        fingerprint: str,
        outcomes: Sequence[EntryOutcome],
        now: datetime,
    ) -> None:
        """Claim the key for a batch inside its writing transaction, as `remember` does."""
        result = {
            "batch": [
                {"user": user_to_json(o.user)}
                if o.user is not None
                else {"error": _error_snapshot(o.error)}
                for o in outcomes
            ]
        }
        await uow.idempotency.delete_expired(
            caller=caller, request_id=request_id, cutoff=now - self._ttl
        )
        await uow.idempotency.add(
            caller=caller, request_id=request_id, fingerprint=fingerprint, result=result, now=now
        )

    async def _result(
        self, caller: str, request_id: str, fingerprint: str
    ) -> dict[str, Any] | None:
        async with self._uow(write=False) as uow:
            record = await uow.idempotency.get(caller=caller, request_id=request_id)
        if record is None or record.create_time < self._clock() - self._ttl:
            return None
        if not hmac.compare_digest(record.fingerprint, fingerprint):
            raise ValidationFailed(
                [
                    FieldViolation(
                        "request_id",
                        "request_id was already used for a different request",
                        "REQUEST_ID_REUSED",
                    )
                ],
                reason="REQUEST_ID_REUSED",
            )
        return record.result

    async def remember(
        self,
        uow: UnitOfWork,
        *,
        caller: str,
        request_id: str,
        fingerprint: str,
        user: UserView,
        now: datetime,
    ) -> None:
        """Claim the key inside the creating transaction; DuplicateRequest if a concurrent
        call holds it. An expired key is forgotten first, so it can be used afresh."""
        await uow.idempotency.delete_expired(
            caller=caller, request_id=request_id, cutoff=now - self._ttl
        )
        await uow.idempotency.add(
            caller=caller,
            request_id=request_id,
            fingerprint=fingerprint,
            result=user_to_json(user),
            now=now,
        )

    async def purge(self) -> int:
        """Forget request ids older than the retention period; returns how many."""

        async def purge(uow: UnitOfWork) -> int:
            count = await uow.idempotency.purge_older_than(self._clock() - self._ttl)
            await uow.commit()
            return count

        return await in_transaction(self._uow, purge)


# The errors a batch entry can end with, by name, to answer a retry as the first call did.
_ENTRY_ERRORS: dict[str, type[DomainError]] = {
    cls.__name__: cls
    for cls in (
        errors.ValidationFailed,
        errors.EmailTaken,
        errors.EmailLookalike,
        errors.PermissionDenied,
        errors.BatchAborted,
    )
}


def _error_snapshot(error: DomainError | None) -> dict[str, Any]:
    assert error is not None
    violations = error.violations if isinstance(error, ValidationFailed) else []
    return {
        "type": type(error).__name__,
        "message": error.message,
        "reason": error.reason,
        "violations": [[v.field, v.description, v.reason] for v in violations],
    }


def _error_from(data: dict[str, Any]) -> DomainError:
    cls = _ENTRY_ERRORS.get(data["type"], DomainError)
    if issubclass(cls, ValidationFailed):
        return ValidationFailed(
            [FieldViolation(*v) for v in data["violations"]], reason=data["reason"]
        )
    error = cls.__new__(cls)
    DomainError.__init__(error, data["message"], reason=data["reason"])
    return error
