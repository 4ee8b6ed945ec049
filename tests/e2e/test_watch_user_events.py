"""WatchUserEvents through real stubs: what a consumer of the change feed sees."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.e2e.auth_helpers import PASSWORD, create_user, login_pair, unique_email
from tests.e2e.conftest import ADMIN_EMAIL, CapturedLogs
from tests.e2e.watch_helpers import Watch
from tests.password_hash_samples import bcrypt_hash
from tests.support import (
    ADMIN_PASSWORD,
    TEST_SECRET,
    ServerThread,
    details_of,
    ensure_admin,
    login,
    make_settings,
)
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.resume_tokens import ResumeTokenCodec


def _admin_token(channel: grpc.Channel) -> str:
    token: str = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
    return token


def _with_id(request_id: str) -> tuple[tuple[str, str]]:
    return (("x-request-id", request_id),)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    assert isinstance(err, grpc.Call)
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


def test_every_change_arrives_once_in_order_and_a_resume_continues_after_it(
    channel: grpc.Channel, users: UserServiceStub
) -> None:
    stub = UserServiceStub(channel)
    watch = Watch(stub, _admin_token(channel)).started()
    assert not watch.responses[0].HasField("event"), "a stream starts with a checkpoint"
    prefix = uuid.uuid4().hex[:8]
    user = users.CreateUser(
        pb.CreateUserRequest(email=unique_email(), name="Feed User", password=PASSWORD),
        metadata=_with_id(f"{prefix}-create"),
    ).user
    users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, name="Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=_with_id(f"{prefix}-rename"),
    )
    users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user.id, roles=["service"]),
            update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
        ),
        metadata=_with_id(f"{prefix}-roles"),
    )
    users.DisableUser(pb.DisableUserRequest(id=user.id), metadata=_with_id(f"{prefix}-disable"))
    users.EnableUser(pb.EnableUserRequest(id=user.id), metadata=_with_id(f"{prefix}-enable"))
    users.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, new_password="another fine passphrase 77"),
        metadata=_with_id(f"{prefix}-password"),
    )
    users.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=_with_id(f"{prefix}-delete"))

    mine = [e for e in watch.wait_for_events(7) if e.user_id == user.id]
    watch.wait_until(lambda w: len([e for e in w.events if e.user_id == user.id]) == 7)
    mine = [e for e in watch.events if e.user_id == user.id]
    assert [e.type for e in mine] == [
        pb.USER_EVENT_TYPE_CREATED,
        pb.USER_EVENT_TYPE_UPDATED,
        pb.USER_EVENT_TYPE_ROLES_CHANGED,
        pb.USER_EVENT_TYPE_DISABLED,
        pb.USER_EVENT_TYPE_ENABLED,
        pb.USER_EVENT_TYPE_PASSWORD_CHANGED,
        pb.USER_EVENT_TYPE_DELETED,
    ]
    assert [e.request_id for e in mine] == [
        f"{prefix}-{step}"
        for step in ("create", "rename", "roles", "disable", "enable", "password", "delete")
    ]
    assert [list(e.changed_fields) for e in mine] == [
        ["email", "name", "password", "roles", "state"],
        ["name"],
        ["roles"],
        ["state"],
        ["state"],
        ["password"],
        ["state"],
    ]
    # The user after each change: its etag moves with every one, and nothing secret is sent.
    assert mine[1].user.name == "Renamed"
    assert list(mine[2].user.roles) == ["service"]
    assert mine[3].user.state == user_pb2.USER_STATE_DISABLED
    assert mine[4].user.state == user_pb2.USER_STATE_ACTIVE
    assert [e.user.etag for e in mine] == [f'"{v}"' for v in range(1, 8)]
    # Soft delete: the deleted event carries the user as it is now.
    assert mine[6].user.state == user_pb2.USER_STATE_DELETED
    assert mine[6].user.HasField("purge_time")
    assert "passphrase" not in str(watch.responses)
    assert all(e.event_time.seconds > 0 for e in mine)

    # Resuming from the token of the third event gives exactly the events after it.
    responses = [r for r in watch.responses if r.HasField("event")]
    third = next(i for i, r in enumerate(responses) if r.event.request_id == f"{prefix}-roles")
    watch.cancel()
    resumed = Watch(stub, _admin_token(channel), after=responses[third].resume_token)
    expected = [r.event.request_id for r in responses[third + 1 :]]
    resumed.wait_for_events(len(expected))
    assert [e.request_id for e in resumed.events][: len(expected)] == expected
    resumed.cancel()


@pytest.mark.one_backend
def test_a_bad_resume_token_is_invalid_argument(channel: grpc.Channel) -> None:
    stub = UserServiceStub(channel)
    token = _admin_token(channel)
    good = ResumeTokenCodec(TEST_SECRET.encode()).encode(1, datetime.now(UTC))
    for bad in ("garbage", good[:-2] + ("AA" if not good.endswith("AA") else "BB"), "x" * 2000):
        watch = Watch(stub, token, after=bad)
        err = watch.wait_done()
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "after" in details_of(err).violations


@pytest.mark.one_backend
def test_a_token_older_than_the_retention_says_resync(channel: grpc.Channel) -> None:
    stub = UserServiceStub(channel)
    old = ResumeTokenCodec(TEST_SECRET.encode()).encode(1, datetime.now(UTC) - timedelta(days=8))
    err = Watch(stub, _admin_token(channel), after=old).wait_done()
    assert err is not None and err.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = details_of(err)
    assert details.reason == "RESUME_TOKEN_EXPIRED"
    assert details.request_id


@pytest.mark.one_backend
def test_only_admins_and_services_may_watch(channel: grpc.Channel, users: UserServiceStub) -> None:
    stub = UserServiceStub(channel)
    anonymous = stub.WatchUserEvents(pb.WatchUserEventsRequest())
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(anonymous))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details_of(caught.value).request_id
    email = unique_email("plain")
    create_user(users, email=email)
    plain = Watch(stub, login_pair(channel, email).access_token)
    err = plain.wait_done()
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_token_ends_an_open_stream(channel: grpc.Channel, users: UserServiceStub) -> None:
    email = unique_email("watcher")
    watcher = create_user(users, email=email)
    users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=watcher.id, roles=["service"]),
            update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
        )
    )
    watch = Watch(UserServiceStub(channel), login_pair(channel, email).access_token).started()
    users.DisableUser(pb.DisableUserRequest(id=watcher.id))
    started = time.monotonic()
    err = watch.wait_done(timeout=10)
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 6  # cache lifetime (2 s here) + one re-check


@pytest.mark.one_backend
def test_shutdown_ends_streams_at_once_with_a_token_to_resume_from(database_url: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir)
        ensure_admin(settings, ADMIN_EMAIL)
        server = ServerThread(settings).start()
        with grpc.insecure_channel(server.address) as ch:
            watch = Watch(UserServiceStub(ch), _admin_token(ch)).started()
            started = time.monotonic()
            server.stop(grace=20)
            err = watch.wait_done(timeout=15)
            assert time.monotonic() - started < 10, "the drain waited on an idle stream"
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(err)
    assert info.reason == "SHUTTING_DOWN"
    token = info.metadata["resume_token"]
    assert token == watch.last_token
    assert details_of(err).trailers["x-resume-token"] == token


@pytest.mark.one_backend
def test_a_stream_gets_a_request_id_and_one_access_log_line_when_it_ends(
    channel: grpc.Channel, logs: CapturedLogs
) -> None:
    rid = f"watch-{uuid.uuid4().hex[:12]}"
    stream = UserServiceStub(channel).WatchUserEvents(
        pb.WatchUserEventsRequest(),
        metadata=(("authorization", f"Bearer {_admin_token(channel)}"), ("x-request-id", rid)),
    )
    assert not next(iter(stream)).HasField("event")
    stream.cancel()
    (line,) = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] == "rpc")
    assert line["method"] == "/userservice.v1.UserService/WatchUserEvents"
    assert line["code"] == "CANCELLED"
    assert line["subject"] and line["roles"] == ["admin"]
    assert line["peer"].startswith("ipv4:127.0.0.1:")

    refused = UserServiceStub(channel).WatchUserEvents(
        pb.WatchUserEventsRequest(after="garbage"),
        metadata=(("authorization", f"Bearer {_admin_token(channel)}"), ("x-request-id", rid)),
    )
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(refused))
    assert details_of(caught.value).request_id == rid
    assert details_of(caught.value).trailers["x-request-id"] == rid


async def _task_count() -> int:
    return len(asyncio.all_tasks())


@pytest.mark.one_backend
def test_a_reader_that_stops_reading_is_cut_off_and_resumes_without_loss(
    database_url: str, logs: CapturedLogs
) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir, watch_slow_consumer_seconds=1)
        ensure_admin(settings, ADMIN_EMAIL)
        server = ServerThread(settings).start()
        # A small receive window (and no BDP growth) so that a few hundred events fill it.
        stalled_options = [("grpc.http2.lookahead_bytes", 16384), ("grpc.http2.bdp_probe", 0)]
        try:
            with (
                grpc.insecure_channel(server.address) as ch,
                grpc.insecure_channel(server.address, options=stalled_options) as slow_ch,
            ):
                token = _admin_token(ch)
                idle_tasks = server.call(_task_count())
                stream = UserServiceStub(slow_ch).WatchUserEvents(
                    pb.WatchUserEventsRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                responses = iter(stream)
                assert not next(responses).HasField("event")
                # The reader stops here, while 300 users are created.
                hashed = bcrypt_hash(PASSWORD)
                emails = [unique_email() for _ in range(300)]
                UserServiceStub(ch).BatchCreateUsers(
                    pb.BatchCreateUsersRequest(
                        users=[
                            pb.BatchCreateUserEntry(email=e, name="Reader", password_hash=hashed)
                            for e in emails
                        ]
                    ),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                # The server stops the feed on its own while the reader still reads nothing.
                # (Its final status waits behind the unread messages: HTTP/2 sends trailers
                # after the data, and grpc.aio cannot reset a stream from the server.)
                ended = logs.wait_for(
                    lambda x: x["message"].startswith("watch stream ended: the consumer took"),
                    timeout=5,
                )
                assert ended, "the stalled stream was not ended"
                seen: list[str] = []
                with pytest.raises(grpc.RpcError) as caught:
                    seen.extend(r.event.user.email for r in responses)
                err = caught.value
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                info = error_info(err)
                assert info.reason == "CONSUMER_TOO_SLOW"
                resume = info.metadata["resume_token"]
                assert details_of(err).trailers["x-resume-token"] == resume
                assert 0 < len(seen) < len(emails), "the stream was not cut mid-way"
                assert seen == emails[: len(seen)]

                rest = Watch(UserServiceStub(ch), token, after=resume)
                missing = set(emails[len(seen) :])
                rest.wait_until(lambda w: {e.user.email for e in w.events} >= missing)
                resumed = [e.user.email for e in rest.events]
                rest.cancel()
                # At least once: from the token on, only the message that was in flight repeats.
                assert resumed[0] in (seen[-1], emails[len(seen)])
                assert seen + resumed[1:] == emails or seen + resumed == emails
                deadline = time.monotonic() + 5
                while server.call(_task_count()) > idle_tasks and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert server.call(_task_count()) <= idle_tasks, "a task outlived its stream"
        finally:
            server.stop()
