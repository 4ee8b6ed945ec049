"""User management use cases."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from usersvc.adapters.page_tokens import InvalidPageToken, PageTokenCodec
from usersvc.adapters.unit_of_work import UnitOfWork, UnitOfWorkFactory
from usersvc.context import request_id_var
from usersvc.domain.auth import KNOWN_ROLES, Principal
from usersvc.domain.errors import (
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    UserNotFound,
    ValidationFailed,
)
from usersvc.domain.events import USER_CREATED, OutboxMessage
from usersvc.domain.models import (
    SERVICE_ACCOUNT_PASSWORD_HASH,
    PageCursor,
    User,
    UserState,
    version_of_etag,
)
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
UPDATABLE_PATHS = frozenset({"name", "email", "roles"})
ADMIN_ONLY_PATHS = frozenset({"roles"})
OUTPUT_ONLY_PATHS = frozenset({"id", "state", "create_time", "update_time", "etag"})

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


def _no_revocation_hook(user_id: uuid.UUID) -> None:
    return None


class UserService:
    """Create, read, list, update and delete users; change passwords; disable and enable."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        page_tokens: PageTokenCodec,
        clock: Clock = utc_now,
        common_passwords: frozenset[str] = frozenset(),
        on_tokens_revoked: Callable[[uuid.UUID], None] = _no_revocation_hook,
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self._page_tokens = page_tokens
        self._clock = clock
        self._common_passwords = common_passwords
        self._on_tokens_revoked = on_tokens_revoked

    def _check_new_password(self, password: str, field: str) -> FieldViolation | None:
        violation = check_password(password, field)
        if violation is None and password.lower() in self._common_passwords:
            violation = FieldViolation(
                field,
                "password is one of the most common passwords; choose another",
                "COMMON_PASSWORD",
            )
        return violation

    async def create_user(
        self,
        *,
        email: str,
        name: str,
        password: str | None,
        roles: Sequence[str] = (),
    ) -> User:
        """Validate every field at once, hash the password, insert; EmailTaken on a duplicate.

        `password=None` makes an account that cannot log in with a password (service accounts).
        """
        email, email_violation = check_email(email)
        name, name_violation = check_name(name)
        password_violation = (
            self._check_new_password(password, "password") if password is not None else None
        )
        violations = [v for v in (email_violation, name_violation, password_violation) if v]
        if violations:
            raise ValidationFailed(violations)
        password_hash = (
            await self._hasher.hash(password)
            if password is not None
            else SERVICE_ACCOUNT_PASSWORD_HASH
        )
        now = self._clock()
        user = User(
            id=uuid.uuid4(),
            email=email,
            name=name,
            password_hash=password_hash,
            roles=tuple(sorted(set(roles))),
            state=UserState.ACTIVE,
            create_time=now,
            update_time=now,
            version=1,
        )
        welcome = OutboxMessage(
            topic=USER_CREATED,
            aggregate_id=user.id,
            payload={"user_id": str(user.id), "email": user.email, "name": user.name},
            request_id=request_id_var.get(),
            create_time=now,
        )
        async with self._uow() as uow:
            await uow.users.add(user)
            # Same transaction: no user without its welcome message, no message without a user.
            await uow.outbox.add(welcome)
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

    async def get_user_by_email(self, email: str) -> User | None:
        async with self._uow(write=False) as uow:
            return await uow.users.get_by_email(normalize_email(email))

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
        actor: Principal,
        user_id: str,
        paths: Sequence[str],
        email: str,
        name: str,
        roles: Sequence[str] = (),
        etag: str,
    ) -> User:
        """Write the masked fields only; checks etag and bumps the version atomically.

        Only admins may write `roles`; a change of roles revokes the user's tokens.
        """
        if not actor.is_admin and ADMIN_ONLY_PATHS & set(paths):
            raise PermissionDenied("only admins may change roles")
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
            elif path == "roles":
                unknown = sorted(set(roles) - KNOWN_ROLES)
                if unknown:
                    violations.append(
                        FieldViolation(
                            "user.roles",
                            f"unknown roles {unknown}; known: {sorted(KNOWN_ROLES)}",
                            "UNKNOWN_ROLE",
                        )
                    )
                values["roles"] = sorted(set(roles))
        if violations or uid is None:
            raise ValidationFailed(violations)
        revoke = "roles" in values
        if revoke:
            current = await self.get_user(str(uid))
            revoke = tuple(values["roles"]) != current.roles
        return await self._write(uid, values, etag=etag, revoke_tokens=revoke)

    async def change_password(
        self,
        *,
        actor: Principal,
        user_id: str,
        current_password: str,
        new_password: str,
        etag: str,
    ) -> User:
        """Set a new password and revoke the user's tokens; self must prove the current one."""
        uid = require_user_id(user_id)
        if not actor.is_admin and not actor.is_self(uid):
            raise PermissionDenied()
        violation = self._check_new_password(new_password, "new_password")
        if violation is not None:
            raise ValidationFailed([violation])
        if not actor.is_admin:
            user = await self.get_user(str(uid))
            if not current_password or not await self._hasher.verify(
                user.password_hash, current_password
            ):
                raise ValidationFailed(
                    [
                        FieldViolation(
                            "current_password", "current password is wrong", "WRONG_PASSWORD"
                        )
                    ]
                )
        password_hash = await self._hasher.hash(new_password)
        return await self._write(
            uid, {"password_hash": password_hash}, etag=etag, revoke_tokens=True
        )

    async def disable_user(self, *, user_id: str, etag: str) -> User:
        """Disable; FailedPrecondition if already disabled. Revokes the user's tokens."""
        uid = require_user_id(user_id)
        return await self._write(
            uid,
            {"state": UserState.DISABLED.value},
            etag=etag,
            require_state=UserState.ACTIVE,
            revoke_tokens=True,
        )

    async def enable_user(self, *, user_id: str, etag: str) -> User:
        """Enable; FailedPrecondition if already active."""
        uid = require_user_id(user_id)
        return await self._write(
            uid, {"state": UserState.ACTIVE.value}, etag=etag, require_state=UserState.DISABLED
        )

    async def add_roles(self, *, user_id: uuid.UUID, roles: Sequence[str]) -> User:
        """Grant roles (operator tooling); revokes tokens so new ones carry the roles."""
        current = await self.get_user(str(user_id))
        merged = sorted(set(current.roles) | set(roles))
        if tuple(merged) == current.roles:
            return current
        return await self._write(user_id, {"roles": merged}, etag="", revoke_tokens=True)

    async def delete_user(self, *, user_id: str, etag: str = "") -> None:
        """Delete; UserNotFound if absent, EtagMismatch if a given etag is stale."""
        uid = require_user_id(user_id)
        expected = self._expected_version(etag)
        async with self._uow() as uow:
            if not await uow.users.delete(uid, expected_version=expected):
                await self._explain_miss(uow, uid, expected, None)
            await uow.commit()
        self._on_tokens_revoked(uid)

    async def _write(
        self,
        uid: uuid.UUID,
        values: dict[str, Any],
        *,
        etag: str,
        require_state: UserState | None = None,
        revoke_tokens: bool = False,
    ) -> User:
        expected = self._expected_version(etag)
        values["update_time"] = self._clock()
        async with self._uow() as uow:
            updated = await uow.users.update(
                uid,
                values,
                expected_version=expected,
                require_state=require_state,
                revoke_tokens=revoke_tokens,
            )
            if updated is None:
                await self._explain_miss(uow, uid, expected, require_state)
                raise AssertionError("unreachable")
            if revoke_tokens:
                await uow.refresh_tokens.revoke_user(uid)
            await uow.commit()
        if revoke_tokens:
            self._on_tokens_revoked(uid)
        return updated

    @staticmethod
    async def _explain_miss(
        uow: UnitOfWork, uid: uuid.UUID, expected: int | None, state: UserState | None
    ) -> None:
        """Raise why a conditional write matched no row."""
        current = await uow.users.get(uid)
        if current is None:
            raise UserNotFound(str(uid))
        if expected is not None and current.version != expected:
            raise EtagMismatch()
        if state is not None and current.state is not state:
            raise FailedPrecondition(
                f"user is already {current.state.value}",
                reason="USER_ALREADY_" + current.state.value.upper(),
            )
        raise EtagMismatch()  # changed between the write and this read

    @staticmethod
    def _expected_version(etag: str) -> int | None:
        if not etag:
            return None
        version = version_of_etag(etag)
        # Never issued by us, so it cannot match any version; existence is still checked first.
        return -1 if version is None else version
