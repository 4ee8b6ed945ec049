"""In-memory stand-ins for the database side of the service layer, for fast unit tests.

The fake repositories subclass the SQL ones only because the UnitOfWork protocol names those
classes; in exchange mypy checks every overriding method against the real signature. No
parent code runs: there is no connection, and a method not faked here fails loudly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

from usersvc.adapters.outbox_repository import OutboxRepository
from usersvc.adapters.refresh_token_repository import RefreshTokenRepository
from usersvc.adapters.user_repository import WRITABLE_COLUMNS, UserRepository
from usersvc.domain.errors import EmailTaken
from usersvc.domain.events import OutboxMessage
from usersvc.domain.models import PageCursor, User, UserState


def list_order_key(user: User) -> tuple[datetime, uuid.UUID]:
    """The list order of the real repository is this key, descending."""
    return (user.create_time, user.id)


@dataclass
class FakeDatabase:
    """Every table the fakes know; values are immutable, so copying the containers suffices."""

    users: dict[uuid.UUID, User] = field(default_factory=dict)
    outbox: list[OutboxMessage] = field(default_factory=list)
    # Users whose refresh tokens were revoked, once per revocation.
    refresh_tokens_revoked: list[uuid.UUID] = field(default_factory=list)

    def copy(self) -> FakeDatabase:
        return FakeDatabase(dict(self.users), list(self.outbox), list(self.refresh_tokens_revoked))


class _Writes:
    def __init__(self, db: FakeDatabase, *, writable: bool) -> None:
        self.db = db
        self._writable = writable

    def _require_writable(self) -> None:
        if not self._writable:
            raise AssertionError("write through a unit of work opened with write=False")


class FakeUserRepository(_Writes, UserRepository):
    """Users in a dict, with the database's unique email, list order and version checks."""

    def _require_email_free(self, email: str, owner: uuid.UUID) -> None:
        # The unique index compares stored values exactly; normalising is the service's job.
        if any(u.email == email and u.id != owner for u in self.db.users.values()):
            raise EmailTaken()

    async def add(self, user: User) -> None:
        self._require_writable()
        if user.id in self.db.users:
            raise AssertionError(f"duplicate primary key {user.id}")
        self._require_email_free(user.email, user.id)
        self.db.users[user.id] = user

    async def get(self, user_id: uuid.UUID) -> User | None:
        return self.db.users.get(user_id)

    async def get_by_email(self, email: str) -> User | None:
        return next((u for u in self.db.users.values() if u.email == email), None)

    async def count(self, *, email: str | None) -> int:
        return sum(1 for u in self.db.users.values() if email is None or u.email == email)

    def _matching(
        self,
        user_id: uuid.UUID,
        expected_version: int | None,
        require_state: UserState | None = None,
    ) -> User | None:
        current = self.db.users.get(user_id)
        if current is None:
            return None
        if expected_version is not None and current.version != expected_version:
            return None
        if require_state is not None and current.state is not require_state:
            return None
        return current

    async def update(
        self,
        user_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        require_state: UserState | None = None,
        revoke_tokens: bool = False,
    ) -> User | None:
        self._require_writable()
        unknown = set(values) - WRITABLE_COLUMNS
        if unknown:
            raise ValueError(f"not writable: {sorted(unknown)}")
        current = self._matching(user_id, expected_version, require_state)
        if current is None:
            return None
        if "email" in values:
            self._require_email_free(values["email"], user_id)
        changes = dict(values)
        if "roles" in changes:
            changes["roles"] = tuple(changes["roles"])
        if "state" in changes:
            changes["state"] = UserState(changes["state"])
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
        return True

    # Last, because inside the class body the name `list` is this method from here on.
    async def list(
        self, *, limit: int, after: PageCursor | None, email: str | None
    ) -> Sequence[User]:
        found = sorted(
            (u for u in self.db.users.values() if email is None or u.email == email),
            key=list_order_key,
            reverse=True,
        )
        if after is not None:
            bound = (after.create_time, after.id)
            found = [u for u in found if list_order_key(u) < bound]
        return found[:limit]


class FakeOutboxRepository(_Writes, OutboxRepository):
    async def add(self, message: OutboxMessage) -> None:
        self._require_writable()
        self.db.outbox.append(message)


class FakeRefreshTokenRepository(_Writes, RefreshTokenRepository):
    """Only what UserService uses: revoking every refresh token of a user."""

    async def revoke_user(self, user_id: uuid.UUID) -> None:
        self._require_writable()
        self.db.refresh_tokens_revoked.append(user_id)


class FakeUnitOfWork:
    """A transaction over a copy of the database: commit publishes it, leaving drops the rest."""

    users: UserRepository
    outbox: OutboxRepository
    refresh_tokens: RefreshTokenRepository

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
    def outbox(self) -> list[OutboxMessage]:
        """The committed outbox messages."""
        return self.db.outbox

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
