"""The User entity and list-query value objects."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime


class UserState(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class User:
    """A user as stored, with its password hash; the service layer answers with UserView."""

    id: uuid.UUID
    email: str
    name: str
    password_hash: str
    roles: tuple[str, ...]
    state: UserState
    create_time: datetime
    update_time: datetime
    version: int
    # Bumped whenever the user's tokens must stop working (password, roles, state changes).
    token_version: int = 1
    failed_login_count: int = 0
    locked_until: datetime | None = None

    @property
    def etag(self) -> str:
        return etag_of(self.version)

    def view(self) -> UserView:
        return UserView(
            id=self.id,
            email=self.email,
            name=self.name,
            roles=self.roles,
            state=self.state,
            create_time=self.create_time,
            update_time=self.update_time,
            version=self.version,
            token_version=self.token_version,
        )


@dataclass(frozen=True, slots=True)
class UserView:
    """A user as the service layer hands it out: no password hash, no login counters."""

    id: uuid.UUID
    email: str
    name: str
    roles: tuple[str, ...]
    state: UserState
    create_time: datetime
    update_time: datetime
    version: int
    token_version: int = 1

    @property
    def etag(self) -> str:
        return etag_of(self.version)


SERVICE_ACCOUNT_PASSWORD_HASH = "!service-account"  # never verifies: no password login


def etag_of(version: int) -> str:
    return f'"{version}"'


def version_of_etag(etag: str) -> int | None:
    """The version an etag stands for, or None for a value this server never issued."""
    if len(etag) < 3 or not (etag[0] == etag[-1] == '"') or not etag[1:-1].isdigit():
        return None
    return int(etag[1:-1])


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Position after the last row of a page: list order is (create_time, id) descending."""

    create_time: datetime
    id: uuid.UUID
