"""A typed client for usersvc: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Offline verification of access tokens: ``userservice.client.jwks`` (needs the ``jwt`` extra).
"""

from userservice.client._channel import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_ATTEMPTS,
    channel_options,
    service_config,
)
from userservice.client.aio import AsyncClient
from userservice.client.errors import (
    Aborted,
    AlreadyExists,
    ApiError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from userservice.client.results import BatchCreateResult
from userservice.client.sync import Client
from userservice.client.watch import AsyncUserEventStream, UserEventStream

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_ATTEMPTS",
    "Aborted",
    "AlreadyExists",
    "ApiError",
    "AsyncClient",
    "AsyncUserEventStream",
    "BatchCreateResult",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "UserEventStream",
    "channel_options",
    "service_config",
]
