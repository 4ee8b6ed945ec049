"""In-memory stand-ins for the service layer's ports, for fast unit tests.

Each fake implements its Protocol from `usersvc.services.ports` directly; mypy checks them
against it, and `tests/contract` runs one set of tests over these fakes and both databases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from usersvc.domain.audit import AuditEvent, tombstone
from usersvc.domain.errors import DuplicateRequest, EmailLookalike, EmailTaken
from usersvc.domain.events import SECRET_PAYLOAD_KEYS, OutboxMessage
from usersvc.domain.models import (
    SERVICE_ACCOUNT_PASSWORD_HASH,
    PageCursor,
    User,
    UserState,
    UserView,
)
from usersvc.domain.one_time_codes import CodePurpose, OneTimeCode
from usersvc.domain.records import (
    ClaimedOutboxMessage,
    IdempotencyRecord,
    OutboxStatus,
    RefreshTokenRecord,
    RefreshTokenStatus,
)
from usersvc.domain.user_events import UserChange
from usersvc.domain.user_filter import UserFilter, matches
from usersvc.domain.validation import email_skeleton
from usersvc.services import ports

# Columns an update may write (the SQL repository refuses anything else the same way).
WRITABLE_COLUMNS = frozenset(
    {
        "email",
        "name",
        "password_hash",
        "password_change_time",
        "roles",
        "state",
        "update_time",
        "failed_login_count",
        "locked_until",
        "delete_time",
        "purge_time",
        "deleted_from_state",
        "labels",
        "admin_metadata",
        "email_verified",
        "password_change_required",
    }
)


def list_order_key(user: User | UserView) -> tuple[datetime, uuid.UUID]:
    """The list order of the real repository is this key, descending."""
    return (user.create_time, user.id)


def audit_order_key(event: AuditEvent) -> tuple[datetime, uuid.UUID]:
    """The list order of the real audit repository is this key, descending."""
    return (event.create_time, event.id)


# As in the SQL repository: an operator needs the gist of an error, not a transcript.
ERROR_MAX_CHARS = 1000


@dataclass(frozen=True)
class OutboxRow:
    """What the outbox table holds beside the message itself."""

    message: OutboxMessage
    status: OutboxStatus
    attempts: int
    next_attempt_time: datetime
    claimed_until: datetime | None = None
    last_error: str | None = None


@dataclass
class FakeDatabase:
    """Every table the fakes know; values are immutable, so copying the containers suffices."""

    users: dict[uuid.UUID, User] = field(default_factory=dict)
    outbox: list[OutboxMessage] = field(default_factory=list)
    # Users whose refresh tokens were revoked, once per revocation.
    refresh_tokens_revoked: list[uuid.UUID] = field(default_factory=list)
    # Refresh tokens by hash, as AuthService stores them.
    refresh_tokens: dict[str, RefreshTokenRecord] = field(default_factory=dict)
    # Append-only, in insertion order.
    audit: list[AuditEvent] = field(default_factory=list)
    # Remembered CreateUser results by (caller, request_id).
    idempotency: dict[tuple[str, str], IdempotencyRecord] = field(default_factory=dict)
    # Outbox rows with their delivery state, by message id.
    outbox_rows: dict[uuid.UUID, OutboxRow] = field(default_factory=dict)
    # The change feed, in feed order.
    user_events: list[UserChange] = field(default_factory=list)
    # Mailed one-time codes by id.
    one_time_codes: dict[uuid.UUID, OneTimeCode] = field(default_factory=dict)

    def copy(self) -> FakeDatabase:
        return FakeDatabase(
            dict(self.users),
            list(self.outbox),
            list(self.refresh_tokens_revoked),
            dict(self.refresh_tokens),
            list(self.audit),
            dict(self.idempotency),
            dict(self.outbox_rows),
            list(self.user_events),
            dict(self.one_time_codes),
        )


class _Writes:
    def __init__(self, db: FakeDatabase, *, writable: bool) -> None:
        self.db = db
        self._writable = writable

    def _require_writable(self) -> None:
        if not self._writable:
            raise AssertionError("write through a unit of work opened with write=False")


class FakeUserRepository(_Writes):
    """Users in a dict, with the database's unique email, list order and version checks."""

    def _require_email_free(self, email: str, owner: uuid.UUID) -> None:
        # The unique indexes compare stored values exactly (the e-mail, and its skeleton);
        # normalising is the service's job.
        others = [u.email for u in self.db.users.values() if u.id != owner]
        if email in others:
            raise EmailTaken()
        skeleton = email_skeleton(email)
        if any(email_skeleton(other) == skeleton for other in others):
            raise EmailLookalike()

    async def add(self, user: User) -> None:
        self._require_writable()
        if user.id in self.db.users:
            raise AssertionError(f"duplicate primary key {user.id}")
        self._require_email_free(user.email, user.id)
        self.db.users[user.id] = user

    async def add_many(self, users: Sequence[User]) -> None:
        for user in users:
            await self.add(user)

    async def email_conflicts(self, emails: Collection[str]) -> dict[str, bool]:
        stored = {u.email for u in self.db.users.values()}
        alike = {email_skeleton(e) for e in stored}
        return {
            email: email in stored
            for email in emails
            if email in stored or email_skeleton(email) in alike
        }

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        # One transaction at a time touches the fake database, so there is nothing to lock;
        # but locking is a write, as on PostgreSQL (SELECT ... FOR UPDATE needs UPDATE rights).
        if for_update:
            self._require_writable()
        return self.db.users.get(user_id)

    async def get_by_email(self, email: str) -> User | None:
        return next((u for u in self.db.users.values() if u.email == email), None)

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[User]:
        return [self.db.users[i] for i in set(user_ids) if i in self.db.users]

    async def count(self, *, where: UserFilter, exact_below: int | None = None) -> int:
        return sum(1 for u in self.db.users.values() if _matches(where, u))

    def _matching(
        self,
        user_id: uuid.UUID,
        expected_version: int | None,
    ) -> User | None:
        current = self.db.users.get(user_id)
        if current is None:
            return None
        if expected_version is not None and current.version != expected_version:
            return None
        return current

    async def update(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        self._require_writable()
        unknown = set(values) - WRITABLE_COLUMNS
        if unknown:
            raise ValueError(f"not writable: {sorted(unknown)}")
        current = self._matching(user_id, expected_version)
        if current is None:
            return None
        if "email" in values:
            self._require_email_free(values["email"], user_id)
        changes = dict(values)
        if "roles" in changes:
            changes["roles"] = tuple(changes["roles"])
        for name in ("labels", "admin_metadata"):
            if name in changes:
                changes[name] = dict(changes[name])
        if "state" in changes:
            changes["state"] = UserState(changes["state"])
        if changes.get("deleted_from_state") is not None:
            changes["deleted_from_state"] = UserState(changes["deleted_from_state"])
        changes["version"] = current.version + 1
        if revoke_tokens:
            changes["token_version"] = current.token_version + 1
        updated = dataclasses.replace(current, **changes)
        self.db.users[user_id] = updated
        return updated

    async def delete(self, user_id: uuid.UUID, *, expected_version: int | None = None) -> bool:
        self._require_writable()
        if self._matching(user_id, expected_version) is None:
            return False
        del self.db.users[user_id]
        # The foreign key cascades to refresh tokens; audit events have none and stay.
        for token_hash, record in list(self.db.refresh_tokens.items()):
            if record.user_id == user_id:
                del self.db.refresh_tokens[token_hash]
        for code_id, code in list(self.db.one_time_codes.items()):
            if code.user_id == user_id:
                del self.db.one_time_codes[code_id]
        return True

    async def list_purgeable(self, *, now: datetime, limit: int) -> Sequence[uuid.UUID]:
        due = sorted(
            (u.purge_time, u.id)
            for u in self.db.users.values()
            if u.state is UserState.DELETED and u.purge_time is not None and u.purge_time <= now
        )
        return [uid for _, uid in due[:limit]]

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        user = self.db.users.get(user_id)
        return (user.token_version, user.state) if user is not None else None

    async def record_login_failure(
        self, user_id: uuid.UUID, *, now: datetime, max_failures: int, lock_until: datetime
    ) -> None:
        self._require_writable()
        user = self.db.users.get(user_id)
        if user is None or (user.locked_until is not None and user.locked_until > now):
            return
        expired = user.locked_until is not None
        count = 1 if expired else user.failed_login_count + 1
        locked = lock_until if not expired and count >= max_failures else None
        self.db.users[user_id] = dataclasses.replace(
            user, failed_login_count=count, locked_until=locked
        )

    async def replace_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        self._require_writable()
        user = self.db.users.get(user_id)
        if user is not None:
            self.db.users[user_id] = dataclasses.replace(user, password_hash=password_hash)

    async def record_login_success(self, user_id: uuid.UUID, *, now: datetime) -> None:
        self._require_writable()
        user = self.db.users.get(user_id)
        if user is not None:
            self.db.users[user_id] = dataclasses.replace(
                user, last_login_time=now, failed_login_count=0, locked_until=None
            )

    async def dormant(self, *, cutoff: datetime, limit: int) -> Sequence[User]:
        found = [
            u
            for u in self.db.users.values()
            if u.state is UserState.ACTIVE
            and u.password_hash != SERVICE_ACCOUNT_PASSWORD_HASH
            and (u.last_login_time if u.last_login_time is not None else u.create_time) < cutoff
        ]
        return sorted(found, key=lambda u: (u.create_time, u.id))[:limit]

    async def reset_login_failures(self, user_id: uuid.UUID) -> None:
        self._require_writable()
        user = self.db.users.get(user_id)
        if user is not None:
            self.db.users[user_id] = dataclasses.replace(
                user, failed_login_count=0, locked_until=None
            )

    # Last, because inside the class body the name `list` is this method from here on.
    async def list(
        self, *, limit: int, after: PageCursor | None, where: UserFilter
    ) -> Sequence[User]:
        found = sorted(
            (u for u in self.db.users.values() if _matches(where, u)),
            key=list_order_key,
            reverse=True,
        )
        if after is not None:
            bound = (after.create_time, after.id)
            found = [u for u in found if list_order_key(u) < bound]
        return found[:limit]


def _matches(where: UserFilter, user: User) -> bool:
    return matches(
        where,
        email=user.email,
        roles=user.roles,
        state=user.state,
        create_time=user.create_time,
        last_login_time=user.last_login_time,
        password_change_time=user.password_change_time,
        labels=user.labels,
    )


class FakeOutboxRepository(_Writes):
    """Outbox rows with the SQL repository's claim, lease fencing and settling rules."""

    async def add(self, message: OutboxMessage) -> None:
        self._require_writable()
        self.db.outbox.append(message)
        self.db.outbox_rows[message.id] = OutboxRow(
            message=message,
            status=OutboxStatus.PENDING,
            attempts=0,
            next_attempt_time=message.create_time,
        )

    async def add_many(self, messages: Sequence[OutboxMessage]) -> None:
        for message in messages:
            await self.add(message)

    async def claim_due(
        self, *, topics: Collection[str], now: datetime, lease_until: datetime, limit: int
    ) -> list[ClaimedOutboxMessage]:
        self._require_writable()
        due = sorted(
            (
                row
                for row in self.db.outbox_rows.values()
                if row.status is OutboxStatus.PENDING
                and row.message.topic in topics
                and row.next_attempt_time <= now
                and (row.claimed_until is None or row.claimed_until < now)
            ),
            key=lambda row: (row.next_attempt_time, row.message.id),
        )[:limit]
        claimed = []
        for row in due:
            self.db.outbox_rows[row.message.id] = dataclasses.replace(
                row, claimed_until=lease_until
            )
            user = self.db.users.get(row.message.aggregate_id)
            if user is not None and user.state is UserState.DELETED:
                user = None  # a soft-deleted user counts as gone, as in the SQL join
            claimed.append(
                ClaimedOutboxMessage(
                    id=row.message.id,
                    topic=row.message.topic,
                    aggregate_id=row.message.aggregate_id,
                    payload=dict(row.message.payload),
                    request_id=row.message.request_id,
                    attempts=row.attempts,
                    create_time=row.message.create_time,
                    claimed_until=lease_until,
                    user_email=user.email if user else None,
                    user_name=user.name if user else None,
                )
            )
        return claimed

    async def mark_delivered(self, message_id: uuid.UUID, *, now: datetime) -> bool:
        self._require_writable()
        row = self.db.outbox_rows.get(message_id)
        if row is None or row.status is not OutboxStatus.PENDING:
            return False
        self.db.outbox_rows[message_id] = dataclasses.replace(
            row,
            status=OutboxStatus.DELIVERED,
            attempts=row.attempts + 1,
            claimed_until=None,
            last_error=None,
            message=_without_secrets(row.message),
        )
        return True

    def _settle_claimed(
        self, message_id: uuid.UUID, claimed_until: datetime, **values: Any
    ) -> bool:
        self._require_writable()
        row = self.db.outbox_rows.get(message_id)
        if row is None or row.status is not OutboxStatus.PENDING:
            return False
        if row.claimed_until != claimed_until:
            return False
        self.db.outbox_rows[message_id] = dataclasses.replace(row, claimed_until=None, **values)
        return True

    async def schedule_retry(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        next_attempt_time: datetime,
        error: str,
        now: datetime,
    ) -> bool:
        return self._settle_claimed(
            message_id,
            claimed_until,
            attempts=attempts,
            next_attempt_time=next_attempt_time,
            last_error=error[:ERROR_MAX_CHARS],
        )

    async def mark_failed(
        self,
        message_id: uuid.UUID,
        *,
        claimed_until: datetime,
        attempts: int,
        error: str,
        now: datetime,
    ) -> bool:
        return self._settle_claimed(
            message_id,
            claimed_until,
            status=OutboxStatus.FAILED,
            attempts=attempts,
            last_error=error[:ERROR_MAX_CHARS],
            message=_without_secrets(self.db.outbox_rows[message_id].message),
        )

    async def mark_skipped(
        self, message_id: uuid.UUID, *, claimed_until: datetime, reason: str, now: datetime
    ) -> bool:
        return self._settle_claimed(
            message_id,
            claimed_until,
            status=OutboxStatus.SKIPPED,
            last_error=reason[:ERROR_MAX_CHARS],
            message=_without_secrets(self.db.outbox_rows[message_id].message),
        )

    async def release(self, message_id: uuid.UUID, *, claimed_until: datetime) -> bool:
        return self._settle_claimed(message_id, claimed_until)


def _without_secrets(message: OutboxMessage) -> OutboxMessage:
    """The row's message once settled (the `outbox` list keeps what was added, for tests)."""
    payload = {k: v for k, v in message.payload.items() if k not in SECRET_PAYLOAD_KEYS}
    return dataclasses.replace(message, payload=payload)


class FakeRefreshTokenRepository(_Writes):
    """Refresh tokens by hash; revoking a user's tokens is also recorded as an event."""

    async def add(
        self,
        *,
        token_hash: str,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        now: datetime,
        expire_time: datetime,
    ) -> None:
        self._require_writable()
        if token_hash in self.db.refresh_tokens:
            raise AssertionError("duplicate token_hash")
        if user_id not in self.db.users:
            raise AssertionError(f"foreign key: no user {user_id}")
        self.db.refresh_tokens[token_hash] = RefreshTokenRecord(
            id=uuid.uuid4(),
            user_id=user_id,
            family_id=family_id,
            status=RefreshTokenStatus.ACTIVE,
            expire_time=expire_time,
        )

    async def get_by_hash(self, token_hash: str) -> RefreshTokenRecord | None:
        return self.db.refresh_tokens.get(token_hash)

    async def revoke_user(self, user_id: uuid.UUID) -> None:
        self._require_writable()
        self.db.refresh_tokens_revoked.append(user_id)
        for token_hash, record in self.db.refresh_tokens.items():
            if record.user_id == user_id and record.status is not RefreshTokenStatus.REVOKED:
                self.db.refresh_tokens[token_hash] = dataclasses.replace(
                    record, status=RefreshTokenStatus.REVOKED
                )

    async def mark_used(self, token_id: uuid.UUID) -> bool:
        self._require_writable()
        for token_hash, record in self.db.refresh_tokens.items():
            if record.id == token_id and record.status is RefreshTokenStatus.ACTIVE:
                self.db.refresh_tokens[token_hash] = dataclasses.replace(
                    record, status=RefreshTokenStatus.USED
                )
                return True
        return False

    async def revoke_family(self, family_id: uuid.UUID) -> None:
        self._require_writable()
        for token_hash, record in self.db.refresh_tokens.items():
            if record.family_id == family_id and record.status is not RefreshTokenStatus.REVOKED:
                self.db.refresh_tokens[token_hash] = dataclasses.replace(
                    record, status=RefreshTokenStatus.REVOKED
                )


class FakeOneTimeCodeRepository(_Writes):
    """Codes by id, with the unique hash, the foreign key and single-use redemption."""

    async def add(self, code: OneTimeCode) -> None:
        self._require_writable()
        if code.user_id not in self.db.users:
            raise AssertionError(f"foreign key: no user {code.user_id}")
        if any(c.code_hash == code.code_hash for c in self.db.one_time_codes.values()):
            raise AssertionError("duplicate code_hash")
        self.db.one_time_codes[code.id] = code

    def _unused(self, user_id: uuid.UUID, purpose: CodePurpose) -> list[OneTimeCode]:
        return [
            c
            for c in self.db.one_time_codes.values()
            if c.user_id == user_id and c.purpose is purpose and c.used_time is None
        ]

    async def supersede(self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime) -> int:
        self._require_writable()
        unused = self._unused(user_id, purpose)
        for code in unused:
            self.db.one_time_codes[code.id] = dataclasses.replace(code, used_time=now)
        return len(unused)

    async def redeem(
        self,
        user_id: uuid.UUID,
        purpose: CodePurpose,
        code_hash: str,
        *,
        now: datetime,
        max_attempts: int,
    ) -> OneTimeCode | None:
        self._require_writable()
        for code in self._unused(user_id, purpose):
            if (
                code.code_hash == code_hash
                and code.expire_time > now
                and code.failed_attempts < max_attempts
            ):
                self.db.one_time_codes[code.id] = dataclasses.replace(code, used_time=now)
                return code
        return None

    async def record_failure(
        self, user_id: uuid.UUID, purpose: CodePurpose, *, now: datetime, max_attempts: int
    ) -> None:
        self._require_writable()
        for code in self._unused(user_id, purpose):
            failed = code.failed_attempts + 1
            self.db.one_time_codes[code.id] = dataclasses.replace(
                code, failed_attempts=failed, used_time=now if failed >= max_attempts else None
            )


class FakeUserEventLog(_Writes):
    async def add(self, change: UserChange) -> None:
        self._require_writable()
        self.db.user_events.append(change)

    async def add_many(self, changes: Sequence[UserChange]) -> None:
        for change in changes:
            await self.add(change)


class FakeAuditRepository(_Writes):
    """Append-only, like the real one, but for the purge's tombstoning."""

    async def add(self, event: AuditEvent) -> None:
        self._require_writable()
        if any(e.id == event.id for e in self.db.audit):
            raise AssertionError(f"duplicate primary key {event.id}")
        self.db.audit.append(event)

    async def add_many(self, events: Sequence[AuditEvent]) -> None:
        for event in events:
            await self.add(event)

    async def tombstone_user(self, user_id: uuid.UUID) -> int:
        self._require_writable()
        changed = 0
        for index, event in enumerate(self.db.audit):
            if event.user_id != user_id:
                continue
            new = tombstone(event.changes)
            if new != event.changes:
                self.db.audit[index] = dataclasses.replace(event, changes=new)
                changed += 1
        return changed

    # Last, because inside the class body the name `list` is this method from here on.
    async def list(
        self, *, limit: int, after: PageCursor | None, user_id: uuid.UUID | None
    ) -> Sequence[AuditEvent]:
        found = sorted(
            (e for e in self.db.audit if user_id is None or e.user_id == user_id),
            key=audit_order_key,
            reverse=True,
        )
        if after is not None:
            bound = (after.create_time, after.id)
            found = [e for e in found if audit_order_key(e) < bound]
        return found[:limit]


class FakeIdempotencyRepository(_Writes):
    """Remembered creates keyed by (caller, request_id), unique like the primary key."""

    async def get(self, *, caller: str, request_id: str) -> IdempotencyRecord | None:
        return self.db.idempotency.get((caller, request_id))

    async def add(
        self,
        *,
        caller: str,
        request_id: str,
        fingerprint: str,
        result: dict[str, Any],
        now: datetime,
    ) -> None:
        self._require_writable()
        key = (caller, request_id)
        if key in self.db.idempotency:
            # What the unit of work makes of the primary key's unique violation.
            raise DuplicateRequest()
        # Stored as JSON: a copy, so later changes to `result` do not leak in.
        self.db.idempotency[key] = IdempotencyRecord(
            fingerprint=fingerprint, result=dict(result), create_time=now
        )

    async def delete_expired(self, *, caller: str, request_id: str, cutoff: datetime) -> None:
        self._require_writable()
        record = self.db.idempotency.get((caller, request_id))
        if record is not None and record.create_time < cutoff:
            del self.db.idempotency[(caller, request_id)]

    async def purge_older_than(self, cutoff: datetime) -> int:
        self._require_writable()
        old = [key for key, r in self.db.idempotency.items() if r.create_time < cutoff]
        for key in old:
            del self.db.idempotency[key]
        return len(old)


class FakeUnitOfWork:
    """A transaction over a copy of the database: commit publishes it, leaving drops the rest."""

    users: FakeUserRepository
    outbox: FakeOutboxRepository
    refresh_tokens: FakeRefreshTokenRepository
    audit: FakeAuditRepository
    idempotency: FakeIdempotencyRepository
    user_events: FakeUserEventLog
    one_time_codes: FakeOneTimeCodeRepository

    def __init__(self, factory: FakeUnitOfWorkFactory, *, write: bool) -> None:
        self.write = write
        self.commits = 0
        self.entered = False
        self.exited = False
        self._factory = factory
        self._working: FakeDatabase | None = None

    @property
    def rolled_back(self) -> bool:
        """Left without committing, so whatever it changed was discarded."""
        return self.exited and self.commits == 0

    def _bind(self, working: FakeDatabase) -> None:
        self._working = working
        self.users = FakeUserRepository(working, writable=self.write)
        self.outbox = FakeOutboxRepository(working, writable=self.write)
        self.refresh_tokens = FakeRefreshTokenRepository(working, writable=self.write)
        self.audit = FakeAuditRepository(working, writable=self.write)
        self.idempotency = FakeIdempotencyRepository(working, writable=self.write)
        self.user_events = FakeUserEventLog(working, writable=self.write)
        self.one_time_codes = FakeOneTimeCodeRepository(working, writable=self.write)

    async def __aenter__(self) -> Self:
        assert not self.entered, "a unit of work is used once"
        self.entered = True
        self._bind(self._factory.db.copy())
        return self

    async def commit(self) -> None:
        assert self._working is not None, "commit outside `async with`"
        self._factory.db = self._working
        self.commits += 1
        # Like the real connection: later statements run in a new transaction.
        self._bind(self._working.copy())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Whatever was not committed is dropped, like closing the real connection.
        self._working = None
        self.exited = True


class FakeUnitOfWorkFactory:
    """Makes units of work on one fake database and remembers each one it made."""

    def __init__(self) -> None:
        self.db = FakeDatabase()
        self.opened: list[FakeUnitOfWork] = []

    def __call__(self, *, write: bool = True) -> FakeUnitOfWork:
        uow = FakeUnitOfWork(self, write=write)
        self.opened.append(uow)
        return uow

    @property
    def store(self) -> dict[uuid.UUID, User]:
        """The committed users."""
        return self.db.users

    @property
    def views(self) -> dict[uuid.UUID, UserView]:
        """The committed users as the service layer hands them out."""
        return {user_id: user.view() for user_id, user in self.db.users.items()}

    @property
    def outbox(self) -> list[OutboxMessage]:
        """The committed outbox messages."""
        return self.db.outbox

    @property
    def audit(self) -> list[AuditEvent]:
        """The committed audit events, oldest first."""
        return self.db.audit

    @property
    def user_events(self) -> list[UserChange]:
        """The committed user events, in feed order."""
        return self.db.user_events

    @property
    def last(self) -> FakeUnitOfWork:
        assert self.opened, "no unit of work was opened"
        return self.opened[-1]


class FakePasswordHasher:
    """Fast and deterministic; records what it was asked to hash."""

    def __init__(self) -> None:
        self.hashed: list[str] = []

    @staticmethod
    def hash_of(password: str) -> str:
        return "fake-sha256$" + hashlib.sha256(password.encode()).hexdigest()

    async def hash(self, password: str) -> str:
        self.hashed.append(password)
        return self.hash_of(password)

    async def verify(self, password_hash: str, password: str) -> bool:
        return password_hash == self.hash_of(password)

    def needs_rehash(self, password_hash: str) -> bool:
        return not password_hash.startswith("fake-sha256$")

    def allows_password_login(self, password_hash: str) -> bool:
        # Like the real hasher: every hash it makes can log in; the service-account marker not.
        return password_hash != SERVICE_ACCOUNT_PASSWORD_HASH


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime) -> None:
        assert start.tzinfo is not None
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


# mypy proves here that every fake implements its port.
_checks: tuple[
    type[ports.UserStore],
    type[ports.Outbox],
    type[ports.RefreshTokenStore],
    type[ports.AuditLog],
    type[ports.IdempotencyKeys],
    type[ports.UnitOfWorkFactory],
    type[ports.PasswordHasher],
    type[ports.Clock],
] = (
    FakeUserRepository,
    FakeOutboxRepository,
    FakeRefreshTokenRepository,
    FakeAuditRepository,
    FakeIdempotencyRepository,
    FakeUnitOfWorkFactory,
    FakePasswordHasher,
    FakeClock,
)
