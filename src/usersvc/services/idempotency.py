"""Idempotent CreateUser (AIP-155): a retry with the same request_id answers as the first call."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from usersvc.domain.errors import FieldViolation, ValidationFailed
from usersvc.domain.models import UserState, UserView
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
        self, email: str, name: str, password: str | None, roles: tuple[str, ...]
    ) -> str:
        # Keyed, so the stored value reveals nothing about the password without the key.
        payload = json.dumps([email, name, password, list(roles)], ensure_ascii=False)
        return hmac.new(self._fingerprint_key, payload.encode(), hashlib.sha256).hexdigest()

    async def remembered(self, caller: str, request_id: str, fingerprint: str) -> UserView | None:
        """The user an earlier call with this key created, or None (unknown or expired);
        ValidationFailed (REQUEST_ID_REUSED) when the key came with another payload."""
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
        return _from_snapshot(record.result)

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
            result=_snapshot(user),
            now=now,
        )

    async def purge(self) -> int:
        """Forget request ids older than the retention period; returns how many."""

        async def purge(uow: UnitOfWork) -> int:
            count = await uow.idempotency.purge_older_than(self._clock() - self._ttl)
            await uow.commit()
            return count

        return await in_transaction(self._uow, purge)


def _snapshot(user: UserView) -> dict[str, Any]:
    """The public fields of a created user, as remembered for idempotent retries."""
    return {
        "id": str(user.id),
        "email": user.email,
        "name": user.name,
        "roles": list(user.roles),
        "state": user.state.value,
        "create_time": user.create_time.isoformat(),
        "update_time": user.update_time.isoformat(),
        "version": user.version,
        "password_change_time": (
            user.password_change_time.isoformat() if user.password_change_time else None
        ),
    }


def _from_snapshot(data: dict[str, Any]) -> UserView:
    return UserView(
        id=uuid.UUID(data["id"]),
        email=data["email"],
        name=data["name"],
        roles=tuple(data["roles"]),
        state=UserState(data["state"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        version=int(data["version"]),
        # Absent from results remembered before the field existed.
        password_change_time=(
            datetime.fromisoformat(data["password_change_time"])
            if data.get("password_change_time")
            else None
        ),
    )
