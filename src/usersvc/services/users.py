"""User management use cases."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from usersvc.adapters.page_tokens import InvalidPageToken, PageTokenCodec
from usersvc.adapters.unit_of_work import UnitOfWorkFactory
from usersvc.domain.errors import (
    EtagMismatch,
    FieldViolation,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.models import PageCursor, User, UserState, version_of_etag
from usersvc.domain.validation import (
    EMAIL_MAX,
    check_email,
    check_name,
    check_password,
    normalize_email,
    parse_user_id,
)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100

# Paths of User an UpdateUser mask may name, and the ones it may never name.
UPDATABLE_PATHS = frozenset({"name", "email"})
OUTPUT_ONLY_PATHS = frozenset({"id", "roles", "state", "create_time", "update_time", "etag"})

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str: ...

    async def verify(self, password_hash: str, password: str) -> bool: ...

    def needs_rehash(self, password_hash: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class ListUsersResult:
    users: Sequence[User]
    next_page_token: str
    total_size: int


def require_user_id(raw: str, field: str = "id") -> uuid.UUID:
    user_id, violation = parse_user_id(raw, field)
    if violation is not None or user_id is None:
        raise ValidationFailed([violation or FieldViolation(field, "id must be a UUID")])
    return user_id


class UserService:
    """Create, read, list, update and delete users."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        page_tokens: PageTokenCodec,
        clock: Clock = utc_now,
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self._page_tokens = page_tokens
        self._clock = clock

    async def create_user(self, *, email: str, name: str, password: str) -> User:
        """Validate every field at once, hash the password, insert; EmailTaken on a duplicate."""
        email, email_violation = check_email(email)
        name, name_violation = check_name(name)
        violations = [v for v in (email_violation, name_violation, check_password(password)) if v]
        if violations:
            raise ValidationFailed(violations)
        password_hash = await self._hasher.hash(password)
        now = self._clock()
        user = User(
            id=uuid.uuid4(),
            email=email,
            name=name,
            password_hash=password_hash,
            roles=(),
            state=UserState.ACTIVE,
            create_time=now,
            update_time=now,
            version=1,
        )
        async with self._uow() as uow:
            await uow.users.add(user)
            await uow.commit()
        return user

    async def get_user(self, user_id: str) -> User:
        """The user with this id; ValidationFailed for a malformed id, UserNotFound if none."""
        uid = require_user_id(user_id)
        async with self._uow(write=False) as uow:
            user = await uow.users.get(uid)
        if user is None:
            raise UserNotFound(str(uid))
        return user

    async def list_users(self, *, page_size: int, page_token: str, email: str) -> ListUsersResult:
        """One page, newest first, with a token for the next page (empty at the end)."""
        violations: list[FieldViolation] = []
        if page_size < 0:
            violations.append(
                FieldViolation("page_size", "page_size must not be negative", "OUT_OF_RANGE")
            )
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)
        email_filter = normalize_email(email) if email else None
        if email_filter is not None and len(email_filter) > EMAIL_MAX:
            violations.append(
                FieldViolation("email", f"email must be at most {EMAIL_MAX} characters", "TOO_LONG")
            )
        query = f"email={email_filter or ''}"
        cursor: PageCursor | None = None
        if page_token:
            try:
                cursor = self._page_tokens.decode(page_token, query=query)
            except InvalidPageToken as err:
                violations.append(FieldViolation("page_token", str(err), "INVALID_PAGE_TOKEN"))
        if violations:
            raise ValidationFailed(violations)
        async with self._uow(write=False) as uow:
            rows = await uow.users.list(limit=size + 1, after=cursor, email=email_filter)
            total = await uow.users.count(email=email_filter)
        page = list(rows[:size])
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = self._page_tokens.encode(
                PageCursor(create_time=last.create_time, id=last.id), query=query
            )
        return ListUsersResult(users=page, next_page_token=next_token, total_size=total)

    async def update_user(
        self,
        *,
        user_id: str,
        paths: Sequence[str],
        email: str,
        name: str,
        etag: str,
    ) -> User:
        """Write the masked fields only; checks etag and bumps the version atomically."""
        violations: list[FieldViolation] = []
        uid, id_violation = parse_user_id(user_id, "user.id")
        if id_violation:
            violations.append(id_violation)
        if not paths:
            violations.append(
                FieldViolation(
                    "update_mask", "update_mask must name at least one field", "REQUIRED"
                )
            )
        values: dict[str, Any] = {}
        for path in paths:
            if path in OUTPUT_ONLY_PATHS:
                violations.append(
                    FieldViolation("update_mask", f"{path!r} cannot be updated", "IMMUTABLE_FIELD")
                )
            elif path not in UPDATABLE_PATHS:
                violations.append(
                    FieldViolation("update_mask", f"unknown field {path!r}", "UNKNOWN_FIELD")
                )
            elif path == "email":
                values["email"], v = check_email(email, "user.email")
                violations.extend([v] if v else [])
            elif path == "name":
                values["name"], v = check_name(name, "user.name")
                violations.extend([v] if v else [])
        if violations or uid is None:
            raise ValidationFailed(violations)
        return await self._apply_update(uid, values, etag=etag)

    async def _apply_update(self, uid: uuid.UUID, values: dict[str, Any], *, etag: str) -> User:
        expected = self._expected_version(etag)
        values["update_time"] = self._clock()
        async with self._uow() as uow:
            updated = await uow.users.update(uid, values, expected_version=expected)
            if updated is None:
                if await uow.users.get(uid) is None:
                    raise UserNotFound(str(uid))
                raise EtagMismatch()
            await uow.commit()
        return updated

    async def delete_user(self, *, user_id: str, etag: str = "") -> None:
        """Delete; UserNotFound if absent, EtagMismatch if a given etag is stale."""
        uid = require_user_id(user_id)
        expected = self._expected_version(etag)
        async with self._uow() as uow:
            if not await uow.users.delete(uid, expected_version=expected):
                if await uow.users.get(uid) is None:
                    raise UserNotFound(str(uid))
                raise EtagMismatch()
            await uow.commit()

    @staticmethod
    def _expected_version(etag: str) -> int | None:
        if not etag:
            return None
        version = version_of_etag(etag)
        if version is None:
            # Never issued by us, so it cannot match the current version.
            raise EtagMismatch()
        return version
