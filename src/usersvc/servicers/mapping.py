"""Domain -> proto conversions shared by the servicers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from userservice.v1 import user_pb2, user_service_pb2
from usersvc.domain import user_events
from usersvc.domain.audit import AuditEvent
from usersvc.domain.models import UserState, UserView

_STATE = {
    UserState.ACTIVE: user_pb2.USER_STATE_ACTIVE,
    UserState.DISABLED: user_pb2.USER_STATE_DISABLED,
    UserState.DELETED: user_pb2.USER_STATE_DELETED,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime) -> Timestamp:
    """A timezone-aware datetime as a Timestamp, by integer arithmetic: Timestamp.FromDatetime
    costs several times as much, twice per user of every list and batch."""
    seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def _put(target: Timestamp, value: datetime) -> None:
    """`timestamp(value)` written into a message's own Timestamp field: no second message
    to build and copy (per user of every page, for each of up to seven times)."""
    seconds, micros = divmod((value - _EPOCH) // _MICROSECOND, 1_000_000)
    target.seconds = seconds
    target.nanos = micros * 1000


def user_to_proto(user: UserView) -> user_pb2.User:
    return _user_message(user_pb2.User, user)


def add_users(
    target: RepeatedCompositeFieldContainer[user_pb2.User], users: Iterable[UserView]
) -> None:
    """Each user as a new element of a response's repeated field: built in place, not built
    and then copied in (per user of every page and batch)."""
    add = target.add
    for user in users:
        _user_message(add, user)


def _user_message(make: Callable[..., user_pb2.User], user: UserView) -> user_pb2.User:
    message = make(
        id=str(user.id),
        email=user.email,
        name=user.name,
        roles=user.roles,
        state=_STATE[user.state],
        etag=user.etag,
        failed_login_count=user.failed_login_count,
        email_verified=user.email_verified,
        password_change_required=user.password_change_required,
    )
    _put(message.create_time, user.create_time)
    _put(message.update_time, user.update_time)
    if user.labels:
        message.labels.update(user.labels)
    if user.admin_metadata:
        # Empty for every caller but an admin (services.users._shown).
        message.admin_metadata.update(user.admin_metadata)
    # Unset stays unset (never logged in, not locked, unknown), not the epoch.
    if user.locked_until is not None:
        _put(message.locked_until, user.locked_until)
    if user.last_login_time is not None:
        _put(message.last_login_time, user.last_login_time)
    if user.password_change_time is not None:
        _put(message.password_change_time, user.password_change_time)
    if user.delete_time is not None:
        _put(message.delete_time, user.delete_time)
    if user.purge_time is not None:
        _put(message.purge_time, user.purge_time)
    return message


_EVENT_TYPE = {
    user_events.CREATED: user_service_pb2.USER_EVENT_TYPE_CREATED,
    user_events.UPDATED: user_service_pb2.USER_EVENT_TYPE_UPDATED,
    user_events.DELETED: user_service_pb2.USER_EVENT_TYPE_DELETED,
    user_events.DISABLED: user_service_pb2.USER_EVENT_TYPE_DISABLED,
    user_events.ENABLED: user_service_pb2.USER_EVENT_TYPE_ENABLED,
    user_events.ROLES_CHANGED: user_service_pb2.USER_EVENT_TYPE_ROLES_CHANGED,
    user_events.PASSWORD_CHANGED: user_service_pb2.USER_EVENT_TYPE_PASSWORD_CHANGED,
    user_events.UNLOCKED: user_service_pb2.USER_EVENT_TYPE_UNLOCKED,
}


def user_event_to_proto(change: user_events.UserChange) -> user_service_pb2.UserEvent:
    return user_service_pb2.UserEvent(
        type=_EVENT_TYPE.get(change.type, user_service_pb2.USER_EVENT_TYPE_UNSPECIFIED),
        user_id=str(change.user_id),
        user=user_to_proto(change.user),
        changed_fields=list(change.changed_fields),
        event_time=timestamp(change.create_time),
        request_id=change.request_id,
    )


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    """A google.protobuf.Struct as the JSON object it stands for."""
    return {key: _plain(value) for key, value in message.fields.items()}


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # Whole numbers stay integers in JSON (as JavaScript clients send them).
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def timestamp_from_epoch(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _value(value: object) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if value is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int | float):
        v.number_value = value
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, list | tuple):
        v.list_value.values.extend(_value(x) for x in value)
    elif isinstance(value, dict):
        # labels and admin_metadata in audit changes: a JSON object (an empty one too).
        v.struct_value.SetInParent()
        for key, item in value.items():
            v.struct_value.fields[str(key)].CopyFrom(_value(item))
    else:
        v.string_value = str(value)
    return v


def audit_event_to_proto(event: AuditEvent) -> user_pb2.AuditEvent:
    return user_pb2.AuditEvent(
        id=str(event.id),
        user_id=str(event.user_id) if event.user_id else "",
        action=event.action,
        changes=[
            user_pb2.FieldChange(
                field=name, old_value=_value(change.get("old")), new_value=_value(change.get("new"))
            )
            for name, change in sorted(event.changes.items())
        ],
        actor=event.actor,
        request_id=event.request_id,
        create_time=timestamp(event.create_time),
    )
