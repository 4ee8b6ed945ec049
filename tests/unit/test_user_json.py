"""One JSON codec for stored users (change-feed events, remembered idempotent results)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from usersvc.domain.models import UserState, UserView
from usersvc.domain.user_json import user_from_json, user_to_json

NOW = datetime(2026, 5, 4, 12, 0, 0, 123456, tzinfo=UTC)


def _user() -> UserView:
    return UserView(
        id=uuid.uuid4(),
        email="ada@example.com",
        name="Ada",
        roles=("admin",),
        state=UserState.DELETED,
        create_time=NOW,
        update_time=NOW,
        version=4,
        password_change_time=NOW,
        delete_time=NOW,
        purge_time=NOW,
        labels={"team": "billing"},
        admin_metadata={"cost_center": 7},
        email_verified=True,
        password_change_required=True,
    )


def test_a_user_survives_the_trip_through_json() -> None:
    user = _user()
    assert user_from_json(json.loads(json.dumps(user_to_json(user)))) == user


def test_omitted_fields_are_not_stored_and_read_back_as_defaults() -> None:
    stored = user_to_json(_user(), omit=("admin_metadata",))
    assert "admin_metadata" not in stored
    assert user_from_json(stored).admin_metadata == {}


def test_rows_from_before_a_field_existed_still_read() -> None:
    oldest = {
        k: v
        for k, v in user_to_json(_user()).items()
        if k in ("id", "email", "name", "roles", "state", "create_time", "update_time", "version")
    }
    user = user_from_json(oldest)
    assert (user.labels, user.email_verified, user.delete_time, user.password_change_time) == (
        {},
        False,
        None,
        None,
    )
