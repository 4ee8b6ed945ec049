"""Maps domain errors to status codes with rich details; hides everything unexpected.

Every error carries google.rpc.ErrorInfo (reason, domain "usersvc") and RequestInfo; validation
errors add BadRequest, retryable ones RetryInfo. Packed by grpcio-status into
grpc-status-details-bin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from usersvc.context import deadline_var, request_id_var
from usersvc.domain import errors as e
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
)
from usersvc.interceptors.request_id import REQUEST_ID_KEY

log = logging.getLogger(__name__)
DOMAIN = "usersvc"

# The one table from domain errors to codes; the first matching class wins (most specific first).
STATUS_OF: tuple[tuple[type[e.DomainError], grpc.StatusCode], ...] = (
    (e.ValidationFailed, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.EtagMismatch, grpc.StatusCode.ABORTED),
    (e.BatchAborted, grpc.StatusCode.ABORTED),
    (e.ConcurrencyConflict, grpc.StatusCode.ABORTED),
    (e.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)
UNAVAILABLE_RETRY_SECONDS = 1.0
# Trailer of a stream that ended early, with the token that resumes it (also in ErrorInfo
# metadata "resume_token").
RESUME_TOKEN_KEY = "x-resume-token"
# Error details are built from caller input: bounded, so that a hostile request cannot make
# the trailer larger than grpc's 16 KiB metadata limit (worst case here is about 6 KiB).
MAX_VIOLATIONS = 10
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 256
MAX_MESSAGE_CHARS = 512


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_for(error: e.DomainError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(status: status_pb2.Status, detail: Any) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


def status_proto(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    violations: list[e.FieldViolation] | None = None,
    retry_after: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> status_pb2.Status:
    """google.rpc.Status with ErrorInfo, RequestInfo and, where given, BadRequest and RetryInfo."""
    request_id = request_id_var.get()
    status = status_pb2.Status(code=code.value[0], message=truncate(message, MAX_MESSAGE_CHARS))
    _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    _pack(status, error_details_pb2.RequestInfo(request_id=request_id))
    if violations:
        bad_request = error_details_pb2.BadRequest()
        for v in violations[:MAX_VIOLATIONS]:
            bad_request.field_violations.add(
                field=truncate(v.field, MAX_FIELD_CHARS),
                description=truncate(v.description, MAX_DESCRIPTION_CHARS),
                reason=truncate(v.reason, MAX_FIELD_CHARS),
            )
        if len(violations) > MAX_VIOLATIONS:
            bad_request.field_violations.add(
                field="*",
                description=f"{len(violations) - MAX_VIOLATIONS} more violations not shown",
                reason="TRUNCATED",
            )
        _pack(status, bad_request)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    violations: list[e.FieldViolation] | None = None,
    retry_after: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> grpc.Status:
    status = status_proto(
        code, message, reason, violations=violations, retry_after=retry_after, metadata=metadata
    )
    request_id = request_id_var.get()
    grpc_status = rpc_status.to_status(status)
    # abort() replaces the trailers, so the request id goes in again.
    extra = (
        ((RESUME_TOKEN_KEY, metadata["resume_token"]),)
        if metadata and "resume_token" in metadata
        else ()
    )
    return _WithRequestId(grpc_status, request_id, extra)


class _WithRequestId(grpc.Status):
    def __init__(
        self, status: grpc.Status, request_id: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = (
            *status.trailing_metadata,
            (REQUEST_ID_KEY, request_id),
            *extra,
        )


def _status_args(error: e.DomainError) -> tuple[grpc.StatusCode, str, str, dict[str, Any]]:
    code = code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        # A domain error nobody mapped is a bug: log it, tell the caller nothing.
        log.error("unmapped domain error %s: %s", type(error).__name__, error.message)
        return code, "internal error", "INTERNAL", {}
    retry_after: float | None = None
    if isinstance(error, e.ResourceExhausted):
        retry_after = error.retry_after_seconds
    elif isinstance(error, e.StorageUnavailable):
        retry_after = UNAVAILABLE_RETRY_SECONDS
    return (
        code,
        error.message,
        error.reason,
        {
            "violations": error.violations if isinstance(error, e.ValidationFailed) else None,
            "retry_after": retry_after,
            "metadata": (
                {"resume_token": error.resume_token} if isinstance(error, e.StreamEnded) else None
            ),
        },
    )


def status_for(error: e.DomainError) -> grpc.Status:
    code, message, reason, extra = _status_args(error)
    return build_status(code, message, reason, **extra)


def entry_status(error: e.DomainError | None) -> status_pb2.Status:
    """The google.rpc.Status of one entry of a batch: OK, or `error` as the call would carry it."""
    if error is None:
        return status_pb2.Status(code=grpc.StatusCode.OK.value[0])
    code, message, reason, extra = _status_args(error)
    return status_proto(code, message, reason, **extra)


class ErrorInterceptor(UnaryWrappingInterceptor):
    """Domain errors -> their status; timeouts -> DEADLINE_EXCEEDED; the rest -> INTERNAL.

    A unary call runs until its caller's deadline, or for `default_timeout` seconds if the
    caller set none (0 or None: unbounded). A caller's deadline also becomes the statement
    timeout of the call's transactions (one SET LOCAL each); the default bound does not, as it
    would cost that round trip on every write without a deadline: the database work is
    cancelled with the call instead.
    """

    def __init__(self, default_timeout: float | None = None) -> None:
        super().__init__()
        self._default_timeout = default_timeout or None

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        default_timeout = self._default_timeout

        async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                remaining = context.time_remaining()
                if remaining is None:
                    if default_timeout is None:
                        return await behavior(request, context)
                    remaining = default_timeout
                else:
                    # The database work below is bounded by the same deadline (statement
                    # timeout).
                    deadline_var.set(time.monotonic() + remaining)
                async with asyncio.timeout(remaining):
                    return await behavior(request, context)
            except e.DomainError as err:
                status = status_for(err)
            except TimeoutError:
                status = build_status(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", "DEADLINE_EXCEEDED"
                )
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                status = build_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
            # abort() rather than abort_with_status(): the same call underneath, but visible to
            # a wrapping context (OpenTelemetry's records the code on the call's span).
            await context.abort(status.code, status.details, status.trailing_metadata)
            raise AssertionError("abort returned")  # pragma: no cover

        return mapped

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def mapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            # No timeout of our own: a stream lasts until the caller's deadline, which grpc
            # enforces, or until it hangs up.
            try:
                async for response in behavior(request, context):
                    yield response
                return
            except e.DomainError as err:
                status = status_for(err)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", method)
                status = build_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
            await context.abort(status.code, status.details, status.trailing_metadata)

        return mapped
