"""Typed forms of answers that carry one outcome per entry of a request."""

from __future__ import annotations

from dataclasses import dataclass

from userservice.client.errors import ApiError
from userservice.v1 import user_pb2, user_service_pb2

_OK = 0


@dataclass(frozen=True)
class BatchCreateResult:
    """The outcome of one BatchCreateUsers entry: ``user`` when it was created, else ``error``,
    the exception CreateUser would have raised for it (``InvalidArgument`` with violations
    such as ``users[3].email``, ``AlreadyExists`` with reason ``EMAIL_TAKEN``, ``Aborted``
    with reason ``BATCH_ABORTED`` for a valid entry of a failed all-or-nothing batch, ...)."""

    user: user_pb2.User | None = None
    error: ApiError | None = None

    @property
    def ok(self) -> bool:
        """Whether the entry's user was created."""
        return self.error is None


def batch_create_results(
    response: user_service_pb2.BatchCreateUsersResponse,
) -> list[BatchCreateResult]:
    """One BatchCreateResult per request entry, in request order."""
    return [
        BatchCreateResult(user=result.user)
        if result.status.code == _OK
        else BatchCreateResult(error=ApiError.from_status(result.status))
        for result in response.results
    ]
