"""Domain -> proto conversions shared by the servicers."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from userservice.v1 import user_pb2
from usersvc.domain.models import User, UserState

_STATE = {
    UserState.ACTIVE: user_pb2.USER_STATE_ACTIVE,
    UserState.DISABLED: user_pb2.USER_STATE_DISABLED,
}


def timestamp(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def user_to_proto(user: User) -> user_pb2.User:
    return user_pb2.User(
        id=str(user.id),
        email=user.email,
        name=user.name,
        roles=list(user.roles),
        state=_STATE[user.state],
        create_time=timestamp(user.create_time),
        update_time=timestamp(user.update_time),
        etag=user.etag,
    )


def timestamp_from_epoch(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
