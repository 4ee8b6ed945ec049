"""Labels and admin metadata through real stubs: who sees and writes what, and the filter."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from tests.e2e.auth_helpers import PASSWORD, bearer, login_pair, service_token_for, unique_email
from tests.e2e.watch_helpers import Watch
from tests.support import ServerThread, details_of
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub


def _struct(**values: str | int) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


# Storage of both fields is compared across the databases by the store contract tests; what
# is checked here (who sees what, the wiring of filter, mask and feed) is decided above it.
@pytest.mark.one_backend
def test_admin_metadata_reaches_admins_only_and_labels_select_users(
    channel: grpc.Channel, users: UserServiceStub, server: ServerThread
) -> None:
    stub = UserServiceStub(channel)
    service = bearer(service_token_for(server.settings, f"labels-{uuid.uuid4().hex[:8]}"))
    watch = Watch(stub, service[0][1].removeprefix("Bearer ")).started()
    team = f"billing-{uuid.uuid4().hex[:8]}"
    email = unique_email("labelled")
    created = users.CreateUser(
        pb.CreateUserRequest(
            email=email,
            name="Labelled User",
            password=PASSWORD,
            labels={"team": team, "env": "prod"},
            admin_metadata=_struct(note="vip", tier=2),
        )
    ).user
    assert dict(created.labels) == {"team": team, "env": "prod"}
    assert dict(created.admin_metadata) == {"note": "vip", "tier": 2}
    other = users.CreateUser(
        pb.CreateUserRequest(
            email=unique_email("other"),
            name="Other User",
            password=PASSWORD,
            labels={"team": "ops"},
        )
    ).user

    # The user itself reads its labels, never the metadata, and cannot write either.
    me = bearer(login_pair(channel, email).access_token)
    mine = stub.GetUser(pb.GetUserRequest(id=created.id), metadata=me).user
    assert dict(mine.labels) == {"team": team, "env": "prod"}
    assert not mine.HasField("admin_metadata")
    for path in ("admin_metadata", "labels"):
        with pytest.raises(grpc.RpcError) as denied:
            stub.UpdateUser(
                pb.UpdateUserRequest(
                    user=user_pb2.User(
                        id=created.id, labels={"team": "x"}, admin_metadata=_struct(note="mine")
                    ),
                    update_mask=field_mask_pb2.FieldMask(paths=[path]),
                ),
                metadata=me,
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # An admin replaces the metadata; the etag moves, the feed names the field only.
    updated = users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=created.id, admin_metadata=_struct(note="vvip")),
            update_mask=field_mask_pb2.FieldMask(paths=["admin_metadata"]),
        )
    ).user
    assert dict(updated.admin_metadata) == {"note": "vvip"} and updated.etag != created.etag
    assert dict(users.GetUser(pb.GetUserRequest(id=created.id)).user.admin_metadata) == {
        "note": "vvip"
    }
    events = [e for e in watch.wait_for_events(3) if e.user_id == created.id]
    watch.cancel()
    assert [e.type for e in events] == [
        pb.USER_EVENT_TYPE_CREATED,
        pb.USER_EVENT_TYPE_UPDATED,
    ]
    assert "admin_metadata" in events[0].changed_fields
    assert list(events[1].changed_fields) == ["admin_metadata"]
    assert all(not e.user.HasField("admin_metadata") for e in events)
    assert dict(events[0].user.labels) == {"team": team, "env": "prod"}

    # The filter, as a service (no metadata) and as an admin (with it).
    wanted = pb.ListUsersRequest(filter=f'labels.team = "{team}" AND labels.env = prod')
    listed = stub.ListUsers(wanted, metadata=service)
    assert [u.id for u in listed.users] == [created.id] and listed.total_size == 1
    assert not listed.users[0].HasField("admin_metadata")
    assert users.ListUsers(wanted).users[0].admin_metadata["note"] == "vvip"
    others = users.ListUsers(pb.ListUsersRequest(filter=f'labels.team != "{team}"', page_size=100))
    assert created.id not in {u.id for u in others.users}
    assert other.id in {
        u.id
        for u in users.ListUsers(
            pb.ListUsersRequest(filter="labels.team = ops", page_size=100)
        ).users
    }

    # Bad keys are INVALID_ARGUMENT naming the filter, or the label.
    with pytest.raises(grpc.RpcError) as bad_filter:
        users.ListUsers(pb.ListUsersRequest(filter='labels.Team = "billing"'))
    assert "filter" in details_of(bad_filter.value).violations
    with pytest.raises(grpc.RpcError) as bad_label:
        users.CreateUser(
            pb.CreateUserRequest(
                email=unique_email("bad"),
                name="Bad Label",
                password=PASSWORD,
                labels={"Bad Key": "x"},
            )
        )
    assert details_of(bad_label.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert 'labels["Bad Key"]' in details_of(bad_label.value).violations
