"""The User entity and list-query value objects."""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from usersvc.domain.errors import DomainError


class UserState(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"
    # Soft-deleted (AIP-164): kept, hidden and unusable until purged or undeleted.
    DELETED = "deleted"


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
    # Set by every successful Login; None: never logged in.
    last_login_time: datetime | None = None
    # Set whenever the password is set; None: unknown (users older than the column).
    password_change_time: datetime | None = None
    # Set while soft-deleted: when, when the purge removes the row, and the state to restore.
    delete_time: datetime | None = None
    purge_time: datetime | None = None
    deleted_from_state: UserState | None = None
    # Bounded key/value pairs (domain.labels); filterable in ListUsers.
    labels: Mapping[str, str] = field(default_factory=dict)
    # A bounded JSON object that only admins read and write.
    admin_metadata: Mapping[str, Any] = field(default_factory=dict)
    # Set by VerifyEmail; every change of the e-mail resets it.
    email_verified: bool = False
    # Set by admins: the user's tokens may then only change the password.
    password_change_required: bool = False

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
            failed_login_count=self.failed_login_count,
            locked_until=self.locked_until,
            last_login_time=self.last_login_time,
            password_change_time=self.password_change_time,
            delete_time=self.delete_time,
            purge_time=self.purge_time,
            labels=self.labels,
            admin_metadata=self.admin_metadata,
            email_verified=self.email_verified,
            password_change_required=self.password_change_required,
        )


@dataclass(frozen=True, slots=True)
class UserView:
    """A user as the service layer hands it out: no password hash. The login counters
    (failed_login_count, locked_until) and admin_metadata are for admins: `for_non_admin`
    blanks them for everyone else."""

    id: uuid.UUID
    email: str
    name: str
    roles: tuple[str, ...]
    state: UserState
    create_time: datetime
    update_time: datetime
    version: int
    token_version: int = 1
    failed_login_count: int = 0
    locked_until: datetime | None = None
    last_login_time: datetime | None = None
    password_change_time: datetime | None = None
    delete_time: datetime | None = None
    purge_time: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    admin_metadata: Mapping[str, Any] = field(default_factory=dict)
    email_verified: bool = False
    password_change_required: bool = False

    @property
    def etag(self) -> str:
        return etag_of(self.version)

    def for_non_admin(self) -> UserView:
        """This view as a caller who is not an admin sees it: no login counters, no
        admin_metadata."""
        if not self.failed_login_count and self.locked_until is None and not self.admin_metadata:
            return self
        return dataclasses.replace(self, failed_login_count=0, locked_until=None, admin_metadata={})


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """One entry of a batch write: the created user, or why it was not created."""

    user: UserView | None = None
    error: DomainError | None = None


SERVICE_ACCOUNT_PASSWORD_HASH = "!service-account"  # never verifies: no password login


def etag_of(version: int) -> str:
    return f'"{version}"'


# Strict: ASCII digits only (str.isdigit() also accepts "²" and "①", which int() refuses) and
# a bounded length (int() refuses more than 4,300 digits; versions never get near 19).
_ETAG = re.compile(r'"([0-9]{1,18})"')


ETAG_MAX = 64
_ETAG_LIKE = re.compile(rf"[\x21-\x7e]{{1,{ETAG_MAX}}}")


def is_etag_like(etag: str) -> bool:
    """Printable ASCII of bounded length: the shape of any HTTP entity tag (RFC 9110), ours
    or not. Anything else is a malformed argument rather than a mismatch."""
    return _ETAG_LIKE.fullmatch(etag) is not None


def version_of_etag(etag: str) -> int | None:
    """The version an etag stands for, or None for a value this server never issued."""
    match = _ETAG.fullmatch(etag)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Position after the last row of a page: list order is (create_time, id) descending."""

    create_time: datetime
    id: uuid.UUID
