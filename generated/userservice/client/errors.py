"""Failed calls as exceptions carrying the server's rich error details (google.rpc)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, from google.rpc.BadRequest."""

    field: str
    description: str


class ApiError(Exception):
    """A call to usersvc failed. Subclasses name the status code (``except NotFound:``)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_delay: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.message = message
        # ErrorInfo: a stable UPPER_SNAKE_CASE cause (branch on this, never on the message).
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        # BadRequest: every bad field of the request at once.
        self.field_violations = field_violations
        # RetryInfo: seconds the server asks the caller to wait before retrying, if it may help.
        self.retry_delay = retry_delay
        # RequestInfo (or the x-request-id trailer): quote it when asking about a failed call.
        self.request_id = request_id

    @property
    def violations(self) -> dict[str, str]:
        """Field violations as {field: description}."""
        return {v.field: v.description for v in self.field_violations}

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ApiError:
        """The exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
        call: Any = err
        code: grpc.StatusCode = call.code()
        message: str = call.details() or ""
        trailers = tuple(call.trailing_metadata() or ())
        request_id = _header(trailers, REQUEST_ID_HEADER)
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # details that contradict the status line: trust the status line
            status = None
        if status is not None:
            return ApiError.from_status(status, request_id=request_id)
        return _BY_CODE.get(code, ApiError)(code, message, request_id=request_id)

    @classmethod
    def from_status(cls, status: status_pb2.Status, *, request_id: str = "") -> ApiError:
        """The exception a google.rpc.Status stands for, such as the status of one
        BatchCreateUsers entry; ``request_id`` is used unless the details carry RequestInfo."""
        code = _CODE_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
        fields: dict[str, Any] = {"request_id": request_id}
        for detail in status.details:
            _unpack(detail, fields)
        return _BY_CODE.get(code, ApiError)(code, status.message, **fields)


def _header(metadata: tuple[Any, ...], name: str) -> str:
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return ""


def _unpack(detail: Any, fields: dict[str, Any]) -> None:
    info = error_details_pb2.ErrorInfo()
    request = error_details_pb2.RequestInfo()
    bad = error_details_pb2.BadRequest()
    retry = error_details_pb2.RetryInfo()
    if detail.Unpack(info):
        fields.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
    elif detail.Unpack(request):
        if request.request_id:
            fields["request_id"] = request.request_id
    elif detail.Unpack(bad):
        fields["field_violations"] = tuple(
            FieldViolation(v.field, v.description) for v in bad.field_violations
        )
    elif detail.Unpack(retry):
        fields["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9


class InvalidArgument(ApiError):
    """The request is malformed; ``field_violations`` lists every bad field."""


class NotFound(ApiError):
    """The resource does not exist (or no longer does)."""


class AlreadyExists(ApiError):
    """A unique value (such as the e-mail) is taken."""


class Aborted(ApiError):
    """A conflict: a stale etag, or a concurrent change. Read again, then retry."""


class FailedPrecondition(ApiError):
    """The resource is not in a state that allows the call (such as already disabled)."""


class Unauthenticated(ApiError):
    """No token, or an invalid, expired or revoked one; log in or refresh."""


class PermissionDenied(ApiError):
    """The caller's roles do not allow the call."""


class ResourceExhausted(ApiError):
    """A limit was hit; wait ``retry_delay`` seconds when it is set."""


class Unavailable(ApiError):
    """The server (or its database) cannot serve now; retrying later may help."""


class DeadlineExceeded(ApiError):
    """The call's deadline ran out; it may or may not have taken effect."""


class Internal(ApiError):
    """A server fault; quote ``request_id`` in the bug report."""


# grpc.StatusCode's values are (number, name) pairs; google.rpc.Status carries the number.
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}
