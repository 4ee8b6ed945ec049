"""password_change_required over a real port: the "pcr" claim and what a token with it may do."""

from __future__ import annotations

import json

import grpc
from google.protobuf import field_mask_pb2

from tests.e2e.auth_helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    b64url_decode,
    bearer,
    code_of,
    failure_of,
    login_pair,
    unique_email,
)
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def claims_of(token: str) -> dict[str, object]:
    payload: dict[str, object] = json.loads(b64url_decode(token.split(".")[1]))
    return payload


def _set_flag(users: UserServiceStub, user_id: str, value: bool) -> user_pb2.User:
    return users.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=user_id, password_change_required=value),
            update_mask=field_mask_pb2.FieldMask(paths=["password_change_required"]),
        )
    ).user


def test_a_flagged_user_logs_in_but_may_only_change_its_password(
    channel: grpc.Channel, users: UserServiceStub
) -> None:
    created = users.CreateUser(
        pb.CreateUserRequest(
            email=unique_email("pcr"),
            name="Flagged",
            password=PASSWORD,
            password_change_required=True,
        )
    ).user
    assert created.password_change_required
    token = login_pair(channel, created.email).access_token
    assert claims_of(token)["pcr"] is True
    stub = UserServiceStub(channel)
    own = bearer(token)

    for call in (
        lambda: stub.GetUser(pb.GetUserRequest(id=created.id), metadata=own),
        lambda: stub.SendVerificationEmail(
            pb.SendVerificationEmailRequest(user_id=created.id), metadata=own
        ),
        lambda: stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(id=created.id, name="Sneaky"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=own,
        ),
    ):
        details = failure_of(call)
        assert (details.code, details.reason) == (DENIED, "PASSWORD_CHANGE_REQUIRED")
    stream = stub.WatchUserEvents(pb.WatchUserEventsRequest(), metadata=own)
    assert code_of(lambda: next(iter(stream))) == DENIED

    changed = stub.ChangePassword(
        pb.ChangePasswordRequest(
            id=created.id, current_password=PASSWORD, new_password=OTHER_PASSWORD
        ),
        metadata=own,
    ).user
    assert not changed.password_change_required
    fresh = login_pair(channel, created.email, OTHER_PASSWORD).access_token
    assert "pcr" not in claims_of(fresh)
    assert stub.GetUser(pb.GetUserRequest(id=created.id), metadata=bearer(fresh)).user.id


def test_setting_the_flag_ends_sessions_and_a_refresh_follows_the_flag(
    channel: grpc.Channel, users: UserServiceStub
) -> None:
    created = users.CreateUser(
        pb.CreateUserRequest(email=unique_email("pcr-set"), name="Later", password=PASSWORD)
    ).user
    before = login_pair(channel, created.email)
    stub = UserServiceStub(channel)
    assert _set_flag(users, created.id, True).password_change_required
    # Setting it revokes: no session goes on without the claim.
    assert (
        code_of(
            lambda: stub.GetUser(
                pb.GetUserRequest(id=created.id), metadata=bearer(before.access_token)
            )
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )
    flagged = login_pair(channel, created.email)
    assert claims_of(flagged.access_token)["pcr"] is True
    # Refresh and Logout need no access token: they work as always, and the refreshed token
    # carries the flag as it is now.
    auth = AuthServiceStub(channel)
    still = auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=flagged.refresh_token))
    assert claims_of(still.tokens.access_token)["pcr"] is True
    _set_flag(users, created.id, False)
    cleared = auth.RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=still.tokens.refresh_token)
    )
    assert "pcr" not in claims_of(cleared.tokens.access_token)
    assert stub.GetUser(
        pb.GetUserRequest(id=created.id), metadata=bearer(cleared.tokens.access_token)
    ).user.id
