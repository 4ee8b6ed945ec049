"""Ports: what the service layer needs from the world, as Protocols the adapters implement.

The service layer imports only `domain` and this module; adapters (SQL, Argon2, Fernet, JWT)
implement these, and the unit-test fakes implement them too, without subclassing SQL code.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self

from usersvc.domain.audit import AuditEvent
from usersvc.domain.events import OutboxMessage
from usersvc.domain.models import PageCursor, User, UserState, UserView
from usersvc.domain.one_time_codes import CodePurpose, OneTimeCode
from usersvc.domain.records import ClaimedOutboxMessage, IdempotencyRecord, RefreshTokenRecord
from usersvc.domain.user_events import UserChange, UserEventRecord
from usersvc.domain.user_filter import UserFilter


class Clock(Protocol):
    """The current time, timezone-aware UTC."""

    def __call__(self) -> datetime: ...


class UserStore(Protocol):
    """Users, with a unique e-mail, the list order (create_time, id) descending, and
    version-checked writes."""

    async def add(self, user: User) -> None:
        """Insert; EmailTaken when the e-mail is taken."""

    async def add_many(self, users: Sequence[User]) -> None:
        """Insert all in a few multi-row statements (no look-alike check beyond the unique
        indexes: callers check with `email_conflicts` first); EmailTaken or EmailLookalike
        when a unique index refuses a row."""

    async def email_conflicts(self, emails: Collection[str]) -> dict[str, bool]:
        """For each of these normalised e-mails that a stored user's address collides with:
        True if it is taken exactly, False if a stored address only looks the same (equal
        Unicode skeleton). E-mails without a collision are left out. One query."""

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        """The user, or None; `for_update` locks the row until the unit of work ends."""

    async def get_by_email(self, email: str) -> User | None: ...

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[User]:
        """The users among `user_ids` that exist, in any order; one round trip."""

    async def list(
        self, *, limit: int, after: PageCursor | None, where: UserFilter
    ) -> Sequence[User]:
        """Up to `limit` users matching `where` in list order, strictly after `after`."""

    async def count(self, *, where: UserFilter, exact_below: int | None = None) -> int:
        """How many users match `where`. With `exact_below`, an unfiltered count (an empty
        `where`) may be the database's estimate instead when that estimate is at least
        `exact_below`; a filtered count is always exact."""

    async def update(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        """Write `values` and bump the version (and the token version with `revoke_tokens`)
        atomically; None when no row matched id and `expected_version`."""

    async def delete(self, user_id: uuid.UUID, *, expected_version: int | None = None) -> bool:
        """Remove the row for good (refresh tokens cascade, audit events stay); False when no
        row matched. Only the purge of soft-deleted users calls it."""

    async def list_purgeable(self, *, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        """Ids of up to `limit` soft-deleted users whose purge time is at or before `now`."""

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        """(token_version, state), or None when the user does not exist."""

    async def record_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, max_failures: int, lock_until: datetime
    ) -> None:
        """Count one failed login atomically; the max_failures-th locks until lock_until; a
        locked account is left alone; after an expired lock counting starts again from one."""

    async def replace_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        """Store a re-hash of the same password; not a change of the user (no new version)."""

    async def reset_login_failures(self, user_id: uuid.UUID) -> None: ...

    async def record_login_success(self, user_id: uuid.UUID, *, now: datetime) -> None:
        """Set last_login_time to `now` and clear failures and lock in one write; not a change
        of the user (no new version)."""

    async def dormant(self, *, cutoff: datetime, limit: int) -> Sequence[User]:
        """Up to `limit` active users that can log in with a password (not service accounts)
        whose last login, or creation if they never logged in, is before `cutoff`."""


class UserPointReads(Protocol):
    """The hot reads (the token check on every authenticated call, GetUser, Login's account,
    batches, unfiltered pages), outside any unit of work: each sees the latest committed row.
    Same answers as the UserStore methods of the same name."""

    async def get(self, user_id: uuid.UUID) -> User | None: ...

    async def get_by_email(self, email: str) -> User | None:
        """UserStore.get_by_email: Login's read, by a normalised address."""
        ...

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None: ...

    async def list_page(self, *, limit: int, after: PageCursor | None) -> Sequence[User]:
        """UserStore.list with no filter (deleted users left out)."""
        ...

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[UserView]:
        """UserStore.get_many, as views: a batch read never needs the password hashes."""
        ...


class RefreshTokenStore(Protocol):
    """Refresh tokens by hash; a family is every token descended from one login."""

    async def add(
        self,
        *,
        token_hash: str,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        now: datetime,
        expire_time: datetime,
    ) -> None: ...

    async def get_by_hash(self, token_hash: str) -> RefreshTokenRecord | None: ...

    async def mark_used(self, token_id: uuid.UUID) -> bool:
        """Move an active token to used atomically; False if it was not active any more."""

    async def revoke_family(self, family_id: uuid.UUID) -> None: ...

    async def revoke_user(self, user_id: uuid.UUID) -> None: ...


class OneTimeCodeStore(Protocol):
    """Mailed one-time codes, stored by hash; each redeemable once, until it expires."""

    async def add(self, code: OneTimeCode) -> None: ...

    async def supersede(self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime) -> int:
        """End every unused code of this user and purpose (a new one replaces them); how many."""

    async def redeem(
        self,
        user_id: uuid.UUID,
        purpose: CodePurpose,
        code_hash: str,
        *,
        now: datetime,
        max_attempts: int,
    ) -> OneTimeCode | None:
        """Mark the matching code used, if it is unused, unexpired and below max_attempts
        failures, in one atomic statement: of concurrent redeems at most one gets it. The
        code as it was before; None when no code matched."""

    async def record_failure(
        self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime, max_attempts: int
    ) -> None:
        """Count a wrong attempt on each unused code of this user and purpose; a code that
        reaches max_attempts is used up."""


class AuditLog(Protocol):
    """Append-only audit events, listed newest first by (create_time, id)."""

    async def add(self, event: AuditEvent) -> None: ...

    async def add_many(self, events: Sequence[AuditEvent]) -> None:
        """Append all in a few multi-row statements."""

    async def tombstone_user(self, user_id: uuid.UUID) -> int:
        """The one sanctioned rewrite, for purging a user: the e-mail and name values in the
        events about `user_id` become the purge marker; how many events changed."""

    async def list(
        self, *, limit: int, after: PageCursor | None, user_id: uuid.UUID | None
    ) -> Sequence[AuditEvent]: ...


class IdempotencyKeys(Protocol):
    """Remembered CreateUser results by (caller, request_id)."""

    async def get(self, *, caller: str, request_id: str) -> IdempotencyRecord | None: ...

    async def add(
        self,
        *,
        caller: str,
        request_id: str,
        fingerprint: str,
        result: dict[str, Any],
        now: datetime,
    ) -> None:
        """Insert; DuplicateRequest (at the latest on commit) when the key exists."""

    async def delete_expired(self, *, caller: str, request_id: str, cutoff: datetime) -> None:
        """Forget one key if it was created before `cutoff`."""

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Forget every key created before `cutoff`; how many."""


class Outbox(Protocol):
    """Messages written in the transaction of the change they announce, delivered later."""

    async def add(self, message: OutboxMessage) -> None: ...

    async def add_many(self, messages: Sequence[OutboxMessage]) -> None:
        """Add all in a few multi-row statements."""

    async def claim_due(
        self, *, topics: Collection[str], now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedOutboxMessage]:
        """Lease up to `limit` due pending messages of `topics`, oldest due first."""

    async def mark_delivered(self, message_id: uuid.UUID, *, now: datetime) -> bool: ...

    async def schedule_retry(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        next_attempt_time: datetime,
        error: str,
        now: datetime,
    ) -> bool: ...

    async def mark_failed(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        error: str,
        now: datetime,
    ) -> bool: ...

    async def mark_skipped(
        self, message_id: uuid.UUID, *, claimed_until: datetime, reason: str, now: datetime
    ) -> bool: ...

    async def release(self, message_id: uuid.UUID, *, claimed_until: datetime) -> bool: ...


class UserEventLog(Protocol):
    """The change feed, written in the transaction of each change it records."""

    async def add(self, change: UserChange) -> None: ...

    async def add_many(self, changes: Sequence[UserChange]) -> None:
        """Append all, in order, in one executemany."""


class UserEventCursor(Protocol):
    """A reader's place in the feed."""

    @property
    def position(self) -> int:
        """Every event at or before it has been returned."""

    async def next_batch(self, limit: int) -> Sequence[UserEventRecord]:
        """The next committed events in feed order, at most `limit`; never one that follows
        an event still being written (so none is ever skipped). Empty: none yet."""


class UserEventSource(Protocol):
    """Reads the change feed outside any unit of work."""

    async def head(self) -> int:
        """The position of "now": every event at or before it is committed or never will be."""

    def cursor(self, position: int) -> UserEventCursor: ...

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Delete events created before `cutoff`; how many."""


class ResumeTokenCodec(Protocol):
    """Opaque, tamper-proof change-feed positions."""

    def encode(self, position: int, time: datetime) -> str: ...

    def decode(self, token: str) -> tuple[int, datetime]:
        """(position, time it was issued for); InvalidResumeToken for garbage or tampering."""


class ChangeSignal(Protocol):
    """Wakes feed readers when events may have committed (a hint; readers still poll)."""

    def ticket(self) -> int:
        """Taken before reading, so a wake-up during the read is not missed."""

    async def wait(self, ticket: int, seconds: float) -> None:
        """Return once woken after `ticket` was taken, or after `seconds`."""


class UnitOfWork(Protocol):
    """One transaction: the stores bound to it; rolled back unless committed explicitly.

    Store errors the caller can act on arrive as domain errors (EmailTaken, DuplicateRequest,
    RetryableConflict, StorageUnavailable).
    """

    @property
    def users(self) -> UserStore: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def refresh_tokens(self) -> RefreshTokenStore: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def idempotency(self) -> IdempotencyKeys: ...

    @property
    def user_events(self) -> UserEventLog: ...

    @property
    def one_time_codes(self) -> OneTimeCodeStore: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def commit(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    """Makes a unit of work; `write=False` for read-only use cases."""

    def __call__(self, *, write: bool = True) -> UnitOfWork: ...


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str:
        """A new hash in the current format (Argon2id with the current parameters)."""

    async def verify(self, password_hash: str, password: str) -> bool:
        """False for a wrong password and for a hash that cannot verify any password. Any
        format of domain.password_hashes verifies (imported bcrypt, PBKDF2, Argon2 hashes)."""

    def needs_rehash(self, password_hash: str) -> bool:
        """True for a hash weaker than the current parameters and for any other format."""

    def allows_password_login(self, password_hash: str) -> bool:
        """Whether this stored hash can ever verify a password (service accounts: no)."""


class PageCursorCodec(Protocol):
    """Opaque page tokens bound to the query they were issued for."""

    def encode(self, cursor: PageCursor, *, query: str) -> str: ...

    def decode(self, token: str, *, query: str) -> PageCursor:
        """The cursor; InvalidPageToken for garbage, tampering, expiry or another query."""


class AccessTokenCodec(Protocol):
    """Signs and verifies access tokens."""

    @property
    def jwks(self) -> list[dict[str, str]]: ...

    def issue(
        self,
        *,
        subject: uuid.UUID,
        roles: tuple[str, ...],
        version: int,
        now: float | None = None,
        ttl_seconds: int | None = None,
        password_change_required: bool = False,
    ) -> tuple[str, float]:
        """A signed token and its expiry (epoch seconds); with `password_change_required`
        the claim "pcr": true, which restricts the token to ChangePassword."""

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; InvalidAccessToken otherwise."""
