"""Domain -> proto conversions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from usersvc.servicers.mapping import timestamp


@pytest.mark.parametrize(
    "value",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1901, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(2026, 11, 27, 15, 3, 4, 999_999, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1))),
        datetime(1991, 5, 4, 12, 0, tzinfo=timezone(timedelta(hours=-7))),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_timestamps_match_the_protobuf_conversion(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    assert timestamp(value) == expected
    assert timestamp(value).ToDatetime(tzinfo=UTC) == value


def test_structs_round_trip_and_audit_objects_stay_objects() -> None:
    from google.protobuf import json_format, struct_pb2

    from usersvc.domain.audit import AuditEvent
    from usersvc.servicers.mapping import audit_event_to_proto, struct_to_dict

    message = struct_pb2.Struct()
    message.update({"n": 2, "x": 0.5, "list": [True, None, "s"], "obj": {"k": {}}})
    plain = struct_to_dict(message)
    assert plain == {"n": 2, "x": 0.5, "list": [True, None, "s"], "obj": {"k": {}}}
    assert isinstance(plain["n"], int)
    event = AuditEvent(
        user_id=None,
        action="user.updated",
        changes={"labels": {"old": {}, "new": {"team": "billing"}}},
        actor="system",
        request_id="r",
        create_time=datetime(2026, 1, 1, tzinfo=UTC),
    )
    change = audit_event_to_proto(event).changes[0]
    assert json_format.MessageToDict(change) == {
        "field": "labels",
        "oldValue": {},
        "newValue": {"team": "billing"},
    }
