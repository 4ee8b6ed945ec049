"""Authentication use cases: login, refresh rotation, logout, and verifying callers."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from usersvc.domain import audit
from usersvc.domain.audit import AuditEvent, redact
from usersvc.domain.auth import PASSWORD_CHANGE_REQUIRED_CLAIM, Principal, TokenPair
from usersvc.domain.errors import InvalidAccessToken, Unauthenticated
from usersvc.domain.models import User, UserState
from usersvc.domain.records import RefreshTokenStatus
from usersvc.domain.validation import check_email, normalize_email, parse_user_id
from usersvc.services.clock import utc_now
from usersvc.services.point_reads import UnitOfWorkPointReads
from usersvc.services.ports import (
    AccessTokenCodec,
    Clock,
    PasswordHasher,
    UnitOfWork,
    UnitOfWorkFactory,
    UserPointReads,
)
from usersvc.services.transactions import in_transaction

log = logging.getLogger(__name__)

REFRESH_TOKEN_BYTES = 32  # 256 bits


def hash_refresh_token(token: str) -> str:
    # A plain SHA-256 suffices: the token is 256 random bits, not a guessable password.
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStateCache:
    """Each user's (token_version, active) for a few seconds, so that a valid call needs no
    database query while a revocation still takes effect within `ttl` seconds everywhere."""

    MAX_ENTRIES = 100_000

    def __init__(
        self,
        uow: UnitOfWorkFactory,
        *,
        ttl: float,
        monotonic: Callable[[], float] = time.monotonic,
        point_reads: UserPointReads | None = None,
    ) -> None:
        self._reads = point_reads or UnitOfWorkPointReads(uow)
        self._ttl = ttl
        self._now = monotonic
        # user id -> (expires at, token version or None if deleted, active)
        self._entries: dict[uuid.UUID, tuple[float, int | None, bool]] = {}

    async def active_version(self, user_id: uuid.UUID, *, at_least: int = 0) -> int | None:
        """The user's token version if it exists and is active, else None.

        A cached version older than `at_least` (the version a token claims) is reloaded: the
        token was issued after a change this replica has not seen yet.
        """
        now = self._now()
        entry = self._entries.get(user_id)
        if entry is not None and entry[0] > now and (entry[1] is None or entry[1] >= at_least):
            return entry[1] if entry[2] else None
        state = await self._reads.auth_state(user_id)
        version = state[0] if state is not None else None
        active = state is not None and state[1] is UserState.ACTIVE
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[user_id] = (now + self._ttl, version, active)
        return version if active else None

    def invalidate(self, user_id: uuid.UUID) -> None:
        """Forget a user at once (this replica); other replicas catch up within ttl."""
        self._entries.pop(user_id, None)


class Authenticator:
    """Turns an `authorization` header value into a Principal, or raises Unauthenticated."""

    def __init__(self, tokens: AccessTokenCodec, states: TokenStateCache) -> None:
        self._tokens = tokens
        self._states = states

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated()
        try:
            claims = self._tokens.verify(token.strip())
            user_id, bad_subject = parse_user_id(str(claims["sub"]), "sub")
            if user_id is None or bad_subject is not None:
                raise InvalidAccessToken("sub is not a user id")
        except (InvalidAccessToken, ValueError) as err:
            log.info("refused token: %s", err)
            raise Unauthenticated() from err
        current = await self._states.active_version(user_id, at_least=claims["ver"])
        if current is None or current != claims["ver"]:
            log.info("refused token: revoked")
            raise Unauthenticated()
        return Principal(
            user_id=user_id,
            roles=frozenset(str(r) for r in claims["roles"]),
            password_change_required=claims.get(PASSWORD_CHANGE_REQUIRED_CLAIM) is True,
        )


class AuthService:
    """Login, refresh-token rotation and logout."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        dummy_hash: str,
        tokens: AccessTokenCodec,
        states: TokenStateCache,
        refresh_ttl_seconds: int,
        max_failures: int,
        lock_seconds: int,
        clock: Clock = utc_now,
        on_login_failure: Callable[[str, bool], None] | None = None,
        point_reads: UserPointReads | None = None,
    ) -> None:
        self._uow = uow
        # Login's read of the account, outside any unit of work.
        self._reads = point_reads or UnitOfWorkPointReads(uow)
        self._hasher = hasher
        self._dummy_hash = dummy_hash
        self._tokens = tokens
        self._states = states
        self._refresh_ttl = timedelta(seconds=refresh_ttl_seconds)
        self._max_failures = max_failures
        self._lock = timedelta(seconds=lock_seconds)
        self._clock = clock
        # Told (reason, locked_out) of every failed login; metrics count them.
        self._on_login_failure = on_login_failure

    async def login(self, *, email: str, password: str, request_id: str = "-") -> TokenPair:
        """A new token pair; one generic Unauthenticated for every kind of failure.

        Every attempt leaves an audit record (carrying `request_id`); failures count towards
        a lock of the account.
        """
        normalized = normalize_email(email)
        user = await self._reads.get_by_email(normalized) if normalized else None
        if user is None or not self._hasher.allows_password_login(user.password_hash):
            # Same hashing work as for a real account, so timing does not reveal which exist.
            await self._hasher.verify(self._dummy_hash, password)
            reason = "unknown_email" if user is None else "no_password_login"
            # Only a well-formed address is kept: a password typed into the e-mail field
            # must not land in the audit trail.
            shown, bad = check_email(email)
            await self._record_failure(
                user.id if user else None, "[invalid]" if bad else shown, reason, request_id
            )
            raise Unauthenticated()
        now = self._clock()
        locked = user.locked_until is not None and user.locked_until > now
        valid = await self._hasher.verify(user.password_hash, password)
        if locked or not valid:
            # This failure locks the account when it is the max_failures-th in a row (an
            # expired lock starts the count again).
            lock_expired = user.locked_until is not None and not locked
            prior = 0 if lock_expired else user.failed_login_count
            await self._record_failure(
                user.id,
                normalized,
                "locked" if locked else "wrong_password",
                request_id,
                count=not locked,
                locks=not locked and prior + 1 >= self._max_failures,
            )
            raise Unauthenticated()
        if user.state is not UserState.ACTIVE:
            # "disabled" or "deleted" in the audit trail; the caller sees the generic refusal.
            await self._record_failure(
                user.id, normalized, user.state.value, request_id, count=False
            )
            raise Unauthenticated()
        new_hash = None
        if self._hasher.needs_rehash(user.password_hash):
            new_hash = await self._hasher.hash(password)

        async def succeed(uow: UnitOfWork) -> TokenPair:
            # last_login_time, and the failure count and any expired lock cleared: one write.
            await uow.users.record_login_success(user.id, now=self._clock())
            if new_hash is not None:
                # Not a change of the resource: etag and token version stay.
                await uow.users.replace_password_hash(user.id, new_hash)
            pair = await self._issue(uow, user, family_id=uuid.uuid4())
            await uow.audit.add(
                self._event(
                    user.id, audit.LOGIN_SUCCEEDED, {"email": (None, normalized)}, request_id
                )
            )
            await uow.commit()
            return pair

        return await in_transaction(self._uow, succeed)

    async def record_refused_login(self, *, request_id: str = "-") -> None:
        """Audit a Login refused before it ran (control characters, over-long values); the
        input itself is not kept."""
        await self._record_failure(None, "[invalid]", "invalid_input", request_id)

    async def _record_failure(
        self,
        user_id: uuid.UUID | None,
        email: str,
        reason: str,
        request_id: str,
        *,
        count: bool = False,
        locks: bool = False,
    ) -> None:
        now = self._clock()
        if self._on_login_failure is not None:
            self._on_login_failure(reason, locks)

        async def record(uow: UnitOfWork) -> None:
            if count and user_id is not None:
                await uow.users.record_login_failure(
                    user_id, now=now, max_failures=self._max_failures, lock_until=now + self._lock
                )
            await uow.audit.add(
                self._event(
                    user_id,
                    audit.LOGIN_FAILED,
                    {"email": (None, email), "outcome": (None, reason)},
                    request_id,
                )
            )
            await uow.commit()

        await in_transaction(self._uow, record)

    def _event(
        self,
        user_id: uuid.UUID | None,
        action: str,
        changes: dict[str, tuple[Any, Any]],
        request_id: str,
    ) -> AuditEvent:
        return AuditEvent(
            user_id=user_id,
            action=action,
            changes=redact(changes),
            actor=audit.ANONYMOUS_ACTOR,
            request_id=request_id,
            create_time=self._clock(),
        )

    async def refresh(self, *, refresh_token: str) -> TokenPair:
        """Rotate: the presented token becomes used; reusing a used one revokes its family."""
        token_hash = hash_refresh_token(refresh_token)

        async def rotate(uow: UnitOfWork) -> TokenPair:
            record = await uow.refresh_tokens.get_by_hash(token_hash)
            if record is None:
                raise Unauthenticated()
            if record.status is RefreshTokenStatus.USED or (
                record.status is RefreshTokenStatus.ACTIVE
                and not await uow.refresh_tokens.mark_used(record.id)
            ):
                # Reuse: someone holds a copy. Revoke the whole login, and keep that revocation.
                await uow.refresh_tokens.revoke_family(record.family_id)
                await uow.commit()
                log.warning(
                    "refresh token reuse: family revoked",
                    extra={"family_id": str(record.family_id)},
                )
                raise Unauthenticated()
            if (
                record.status is not RefreshTokenStatus.ACTIVE
                or record.expire_time <= self._clock()
            ):
                raise Unauthenticated()
            user = await uow.users.get(record.user_id)
            if user is None or user.state is not UserState.ACTIVE:
                raise Unauthenticated()
            pair = await self._issue(
                uow, user, family_id=record.family_id, family_expires=record.expire_time
            )
            await uow.commit()
            return pair

        return await in_transaction(self._uow, rotate)

    async def logout(self, *, refresh_token: str) -> None:
        """Revoke every refresh token of the refresh token's login."""
        token_hash = hash_refresh_token(refresh_token)

        async def revoke(uow: UnitOfWork) -> None:
            record = await uow.refresh_tokens.get_by_hash(token_hash)
            if record is None:
                raise Unauthenticated()
            await uow.refresh_tokens.revoke_family(record.family_id)
            await uow.commit()

        await in_transaction(self._uow, revoke)

    def jwks(self) -> list[dict[str, str]]:
        return self._tokens.jwks

    async def _issue(
        self,
        uow: UnitOfWork,
        user: User,
        *,
        family_id: uuid.UUID,
        family_expires: datetime | None = None,
    ) -> TokenPair:
        """A new pair. A rotated refresh token keeps its login's expiry, so refreshing never
        extends a login beyond the refresh-token lifetime."""
        now = self._clock()
        access, access_exp = self._tokens.issue(
            subject=user.id,
            roles=user.roles,
            version=user.token_version,
            now=now.timestamp(),
            # Read from the user at every issue: a refresh after the flag was cleared drops it.
            password_change_required=user.password_change_required,
        )
        refresh = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        expires = family_expires if family_expires is not None else now + self._refresh_ttl
        await uow.refresh_tokens.add(
            token_hash=hash_refresh_token(refresh),
            user_id=user.id,
            family_id=family_id,
            now=now,
            expire_time=expires,
        )
        return TokenPair(
            access_token=access,
            access_expires_at=access_exp,
            refresh_token=refresh,
            refresh_expires_at=expires.timestamp(),
        )
