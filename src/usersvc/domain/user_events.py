"""User events: the change feed other services follow (WatchUserEvents).

One event per committed change of a user, written in the transaction of the change, so the
feed holds exactly the committed changes. Each carries the user as it is after the change
(never a secret) and the names of the fields that changed.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime

from usersvc.domain import audit
from usersvc.domain.models import UserView

CREATED = "created"
UPDATED = "updated"
DELETED = "deleted"
DISABLED = "disabled"
ENABLED = "enabled"
ROLES_CHANGED = "roles_changed"
PASSWORD_CHANGED = "password_changed"
UNLOCKED = "unlocked"

# The event type of each audit action that changes a user.
TYPE_OF_ACTION = {
    audit.USER_CREATED: CREATED,
    audit.USER_UPDATED: UPDATED,
    audit.USER_DELETED: DELETED,
    audit.USER_DISABLED: DISABLED,
    audit.USER_ENABLED: ENABLED,
    audit.USER_ROLES_CHANGED: ROLES_CHANGED,
    audit.USER_PASSWORD_CHANGED: PASSWORD_CHANGED,
    audit.USER_PASSWORD_RECOVERED: PASSWORD_CHANGED,
    audit.USER_UNLOCKED: UNLOCKED,
}

# Fields a user event may name as changed; anything else (a hash, a counter) never appears.
# admin_metadata is named when it changes, but its value is never in an event.
PUBLIC_FIELDS = frozenset(
    {
        "email",
        "name",
        "roles",
        "state",
        "password",
        "failed_login_count",
        "locked_until",
        "labels",
        "admin_metadata",
        "email_verified",
        "password_change_required",
    }
)


@dataclass(frozen=True, slots=True)
class UserChange:
    """A change about to be written with the transaction that makes it."""

    type: str
    user: UserView
    changed_fields: tuple[str, ...]
    request_id: str
    create_time: datetime

    @property
    def user_id(self) -> uuid.UUID:
        return self.user.id


@dataclass(frozen=True, slots=True)
class UserEventRecord:
    """A committed user event at its position in the feed."""

    position: int
    change: UserChange


def change_of(
    action: str,
    user: UserView,
    changed: list[str] | tuple[str, ...],
    request_id: str,
    now: datetime,
) -> UserChange:
    """The user event of an audit action, naming only public fields, sorted."""
    return UserChange(
        # An action without a type of its own still changed the user (and its etag).
        type=TYPE_OF_ACTION.get(action, UPDATED),
        # Every watcher reads the same event, service watchers too: admin_metadata stays out.
        user=dataclasses.replace(user, admin_metadata={}) if user.admin_metadata else user,
        changed_fields=tuple(sorted(f for f in set(changed) if f in PUBLIC_FIELDS)),
        request_id=request_id,
        create_time=now,
    )


# What a created user "changed": every public field it was created with.
CREATED_FIELDS = ("email", "name", "roles", "state", "password")


def created(user: UserView, request_id: str, now: datetime) -> UserChange:
    """The event of a user's creation (CreateUser, or one user of a batch); labels and
    admin_metadata count among its fields when it was created with them."""
    fields: tuple[str, ...] = CREATED_FIELDS
    if user.labels:
        fields += ("labels",)
    if user.admin_metadata:
        fields += ("admin_metadata",)
    return change_of(audit.USER_CREATED, user, fields, request_id, now)
