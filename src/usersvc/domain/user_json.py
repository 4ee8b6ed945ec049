"""A user as JSON, for the places that store one: change-feed events and remembered results of
idempotent creates. One codec, so that a new field reaches both (and both read rows written
before a field existed: absent keys decode to the field's default).

Never stored: the password hash (a UserView has none), the admins-only login counters and
the last login time (they change without a new version of the user).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

from usersvc.domain.models import UserState, UserView


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time_of(value: str | None) -> datetime | None:
    # Stored from timezone-aware UTC datetimes.
    return datetime.fromisoformat(value) if value else None


def user_to_json(user: UserView, *, omit: Collection[str] = ()) -> dict[str, Any]:
    """The user's stored fields, less `omit`."""
    data: dict[str, Any] = {
        "id": str(user.id),
        "email": user.email,
        "name": user.name,
        "roles": list(user.roles),
        "state": user.state.value,
        "create_time": user.create_time.isoformat(),
        "update_time": user.update_time.isoformat(),
        "version": user.version,
        "password_change_time": _time(user.password_change_time),
        "delete_time": _time(user.delete_time),
        "purge_time": _time(user.purge_time),
        "labels": dict(user.labels),
        "admin_metadata": dict(user.admin_metadata),
        "email_verified": user.email_verified,
        "password_change_required": user.password_change_required,
    }
    for key in omit:
        del data[key]
    return data


def user_from_json(data: dict[str, Any]) -> UserView:
    return UserView(
        id=uuid.UUID(data["id"]),
        email=data["email"],
        name=data["name"],
        roles=tuple(data["roles"]),
        state=UserState(data["state"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        version=int(data["version"]),
        password_change_time=_time_of(data.get("password_change_time")),
        delete_time=_time_of(data.get("delete_time")),
        purge_time=_time_of(data.get("purge_time")),
        labels=data.get("labels") or {},
        admin_metadata=data.get("admin_metadata") or {},
        email_verified=bool(data.get("email_verified", False)),
        password_change_required=bool(data.get("password_change_required", False)),
    )
