"""Request building shared by the sync and asyncio clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import field_mask_pb2

from userservice.client.errors import REQUEST_ID_HEADER
from userservice.v1 import user_pb2, user_service_pb2

TokenSource = Callable[[], str | None]
"""Returns the access token to send, or None for no token; called before every call, so it
can refresh an expiring token (see TokenPair.access_token_expire_time)."""


def call_metadata(token: TokenSource | None) -> tuple[tuple[str, str], ...]:
    """x-request-id (a new UUID per call) and authorization (when there is a token)."""
    metadata = [(REQUEST_ID_HEADER, str(uuid.uuid4()))]
    value = token() if token is not None else None
    if value:
        metadata.append(("authorization", f"Bearer {value}"))
    return tuple(metadata)


def create_user_request(
    email: str,
    name: str,
    password: str,
    request_id: str | None,
    labels: Mapping[str, str] | None = None,
    admin_metadata: Mapping[str, Any] | None = None,
    password_change_required: bool = False,
) -> user_service_pb2.CreateUserRequest:
    # Always with an idempotency key, so that retrying after UNAVAILABLE cannot create twice.
    request = user_service_pb2.CreateUserRequest(
        email=email,
        name=name,
        password=password,
        request_id=request_id or str(uuid.uuid4()),
        labels=dict(labels or {}),
        password_change_required=password_change_required,
    )
    if admin_metadata:
        request.admin_metadata.update(admin_metadata)
    return request


def batch_create_users_request(
    users: Sequence[user_service_pb2.BatchCreateUserEntry],
    all_or_nothing: bool,
    request_id: str | None,
) -> user_service_pb2.BatchCreateUsersRequest:
    # As for CreateUser: an idempotency key always, so that a retry cannot create twice.
    return user_service_pb2.BatchCreateUsersRequest(
        users=list(users),
        all_or_nothing=all_or_nothing,
        request_id=request_id or str(uuid.uuid4()),
    )


def update_user_request(
    user: user_pb2.User, paths: Sequence[str]
) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )
