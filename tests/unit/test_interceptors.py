"""Each interceptor on its own, around a dummy handler: no database, no port, no servicer."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from usersvc.context import principal_var, request_id_var
from usersvc.domain.auth import ADMIN, SERVICE, Principal
from usersvc.domain.errors import (
    FieldViolation,
    Overloaded,
    PermissionDenied,
    StorageUnavailable,
    Unauthenticated,
    UserNotFound,
    ValidationFailed,
)
from usersvc.interceptors.access_log import AccessLogInterceptor
from usersvc.interceptors.auth import PUBLIC, AuthInterceptor, MethodPolicy
from usersvc.interceptors.base import InterceptorChain, UnaryWrappingInterceptor
from usersvc.interceptors.errors import ErrorInterceptor
from usersvc.interceptors.request_id import (
    REQUEST_ID_KEY,
    UNIMPLEMENTED_HANDLER,
    RequestIdInterceptor,
)
from usersvc.services.auth import Authenticator

Behavior = Callable[[Any, Any], Awaitable[Any]]


class RecordedStatus(grpc.Status):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class DummyContext:
    """The parts of grpc.aio.ServicerContext the interceptors use, recorded."""

    def __init__(
        self, metadata: tuple[tuple[str, str], ...] = (), time_remaining: float | None = None
    ) -> None:
        self._metadata = metadata
        self._time_remaining = time_remaining
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.aborted: grpc.Status | None = None
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def time_remaining(self) -> float | None:
        return self._time_remaining

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        self.aborted = RecordedStatus(code, details, trailing_metadata)
        self._code = code
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        # As grpc.aio does it.
        await self.abort(status.code, status.details, status.trailing_metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return "ipv4:127.0.0.1:12345"


class CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def handler_through(
    interceptor: UnaryWrappingInterceptor | InterceptorChain, method: str, behavior: Behavior
) -> tuple[grpc.RpcMethodHandler[Any, Any], int]:
    """The handler the interceptor serves `method` with, and how often it asked for the next."""
    asked = 0

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        nonlocal asked
        asked += 1
        return grpc.unary_unary_rpc_method_handler(behavior)

    handler = await interceptor.intercept_service(continuation, CallDetails(method))
    assert handler is not None
    return handler, asked


async def call(
    interceptor: UnaryWrappingInterceptor,
    behavior: Behavior,
    context: DummyContext,
    request: Any = None,
    method: str = "/test.v1.Test/Do",
) -> Any:
    handler, _ = await handler_through(interceptor, method, behavior)
    assert handler.unary_unary is not None
    return await handler.unary_unary(request, context)  # type: ignore[arg-type]


def details_of(status: grpc.Status) -> dict[str, Any]:
    """The google.rpc details packed into an aborted status, by type name."""
    trailers = dict(status.trailing_metadata)
    proto = rpc_status.status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    found: dict[str, Any] = {"message": proto.message}
    for packed in proto.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RequestInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if packed.Is(cls.DESCRIPTOR):
                detail = cls()
                packed.Unpack(detail)
                found[cls.__name__] = detail
    return found


# --- request id ----------------------------------------------------------------------------


async def test_a_sane_request_id_is_kept_for_the_call_and_echoed() -> None:
    seen: list[str] = []

    async def behavior(request: Any, context: Any) -> str:
        seen.append(request_id_var.get())
        return "ok"

    context = DummyContext(metadata=((REQUEST_ID_KEY, "client-req.42"),))
    assert await call(RequestIdInterceptor(), behavior, context) == "ok"
    assert seen == ["client-req.42"]
    assert context.trailers == ((REQUEST_ID_KEY, "client-req.42"),)
    assert request_id_var.get() == "-"  # reset after the call


@pytest.mark.parametrize("sent", ["", "x" * 129, "spaces are not allowed", "new\nline"])
async def test_an_insane_request_id_is_replaced_by_a_uuid(sent: str) -> None:
    seen: list[str] = []

    async def behavior(request: Any, context: Any) -> None:
        seen.append(request_id_var.get())

    context = DummyContext(metadata=((REQUEST_ID_KEY, sent),))
    await call(RequestIdInterceptor(), behavior, context)
    assert seen[0] != sent
    assert str(uuid.UUID(seen[0])) == seen[0]
    assert context.trailers == ((REQUEST_ID_KEY, seen[0]),)


async def test_the_wrapped_handler_is_built_once_per_method() -> None:
    async def behavior(request: Any, context: Any) -> None:
        return None

    interceptor = RequestIdInterceptor()
    first, asked_first = await handler_through(interceptor, "/test.v1.Test/Do", behavior)
    again, asked_again = await handler_through(interceptor, "/test.v1.Test/Do", behavior)
    other, _ = await handler_through(interceptor, "/test.v1.Test/Other", behavior)
    assert (asked_first, asked_again) == (1, 0)
    assert again is first
    assert other is not first


class _Recording(UnaryWrappingInterceptor):
    def __init__(self, name: str, seen: list[str]) -> None:
        super().__init__()
        self._name = name
        self._seen = seen

    def wrap(self, method: str, behavior: Behavior) -> Behavior:
        async def recorded(request: Any, context: Any) -> Any:
            self._seen.append(f"{self._name}>")
            try:
                return await behavior(request, context)
            finally:
                self._seen.append(f"<{self._name}")

        return recorded


async def test_a_chain_runs_its_concerns_in_order_and_builds_each_method_once() -> None:
    seen: list[str] = []
    chain = InterceptorChain([_Recording("outer", seen), _Recording("inner", seen)])

    async def behavior(request: Any, context: Any) -> str:
        seen.append("handler")
        return "answer"

    first, asked_first = await handler_through(chain, "/test.v1.Test/Do", behavior)
    again, asked_again = await handler_through(chain, "/test.v1.Test/Do", behavior)
    assert (asked_first, asked_again) == (1, 0) and again is first
    assert first.unary_unary is not None
    assert await first.unary_unary(None, DummyContext()) == "answer"  # type: ignore[arg-type]
    assert seen == ["outer>", "inner>", "handler", "<inner", "<outer"]


async def test_a_chain_answers_unknown_methods_through_its_concerns_without_caching() -> None:
    asked = 0

    async def continuation(details: grpc.HandlerCallDetails) -> None:
        nonlocal asked
        asked += 1

    seen: list[str] = []
    plain = InterceptorChain([_Recording("only", seen)])
    with_fallback = InterceptorChain([_Recording("outer", seen), RequestIdInterceptor()])
    for _ in range(2):
        assert await plain.intercept_service(continuation, CallDetails("/no.Such/Method")) is None
        handler = await with_fallback.intercept_service(
            continuation, CallDetails("/no.Such/Method")
        )
        assert handler is UNIMPLEMENTED_HANDLER
    assert asked == 4


# --- error mapping -------------------------------------------------------------------------


async def _aborted_with(error: BaseException, time_remaining: float | None = None) -> grpc.Status:
    async def behavior(request: Any, context: Any) -> None:
        raise error

    context = DummyContext(time_remaining=time_remaining)
    token = request_id_var.set("req-err-1")
    try:
        with pytest.raises(grpc.aio.AbortError):
            await call(ErrorInterceptor(), behavior, context)
    finally:
        request_id_var.reset(token)
    assert context.aborted is not None
    return context.aborted


async def test_a_domain_error_becomes_its_status_with_error_and_request_info() -> None:
    status = await _aborted_with(UserNotFound("123"))
    assert status.code is grpc.StatusCode.NOT_FOUND
    details = details_of(status)
    assert details["ErrorInfo"].reason == "USER_NOT_FOUND"
    assert details["ErrorInfo"].domain == "usersvc"
    assert details["RequestInfo"].request_id == "req-err-1"
    assert (REQUEST_ID_KEY, "req-err-1") in status.trailing_metadata


async def test_a_validation_error_lists_every_bad_field() -> None:
    status = await _aborted_with(
        ValidationFailed(
            [FieldViolation("email", "bad", "INVALID_FORMAT"), FieldViolation("name", "short")]
        )
    )
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    violations = details_of(status)["BadRequest"].field_violations
    assert [(v.field, v.reason) for v in violations] == [
        ("email", "INVALID_FORMAT"),
        ("name", "INVALID_FIELD"),
    ]


async def test_an_unavailable_database_says_when_to_retry() -> None:
    status = await _aborted_with(StorageUnavailable())
    assert status.code is grpc.StatusCode.UNAVAILABLE
    assert details_of(status)["RetryInfo"].retry_delay.seconds == 1


async def test_an_overloaded_hash_queue_is_resource_exhausted_with_its_retry_delay() -> None:
    status = await _aborted_with(Overloaded("too many password hashes", retry_after=1.5))
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    details = details_of(status)
    assert details["ErrorInfo"].reason == "OVERLOADED"
    assert details["RetryInfo"].retry_delay.ToNanoseconds() == 1_500_000_000


async def test_an_unexpected_error_is_internal_and_tells_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        status = await _aborted_with(RuntimeError("secret detail of a bug"))
    assert status.code is grpc.StatusCode.INTERNAL
    details = details_of(status)
    assert details["message"] == "internal error"
    assert "secret detail" not in repr(status.trailing_metadata)
    assert "secret detail of a bug" in caplog.text  # the traceback goes to the server log


async def test_a_handler_outlasting_the_deadline_is_deadline_exceeded() -> None:
    async def behavior(request: Any, context: Any) -> None:
        await asyncio.sleep(5)

    context = DummyContext(time_remaining=0.01)
    with pytest.raises(grpc.aio.AbortError):
        await call(ErrorInterceptor(), behavior, context)
    assert context.aborted is not None
    assert context.aborted.code is grpc.StatusCode.DEADLINE_EXCEEDED


# --- authentication and authorization ------------------------------------------------------

ADMIN_USER = Principal(user_id=uuid.uuid4(), roles=frozenset({ADMIN}))
SERVICE_USER = Principal(user_id=uuid.uuid4(), roles=frozenset({SERVICE}))
PLAIN_USER = Principal(user_id=uuid.uuid4(), roles=frozenset())
TOKENS = {"admin-token": ADMIN_USER, "service-token": SERVICE_USER, "plain-token": PLAIN_USER}

POLICIES = {
    "/test.v1.Test/AdminOnly": MethodPolicy(public=False, roles=frozenset({ADMIN}), self_field=()),
    "/test.v1.Test/AdminOrSelf": MethodPolicy(
        public=False, roles=frozenset({ADMIN}), self_field=("user", "id")
    ),
    "/test.v1.Test/AdminOrSelfBatch": MethodPolicy(
        public=False, roles=frozenset({ADMIN}), self_field=("ids",)
    ),
    "/test.v1.Test/Public": PUBLIC,
}


class TokenTable(Authenticator):
    """Callers by bearer token, without signatures or a database."""

    def __init__(self) -> None:
        pass

    async def authenticate(self, authorization: str | None) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer" or token not in TOKENS:
            raise Unauthenticated()
        return TOKENS[token]


class User:
    def __init__(self, user_id: uuid.UUID) -> None:
        self.id = str(user_id)


class Request:
    def __init__(self, user_id: uuid.UUID) -> None:
        self.user = User(user_id)


async def _as(token: str | None, method: str, request: Any = None) -> Principal | None:
    """Call `method` with `token`; the caller the handler saw."""

    async def behavior(request: Any, context: Any) -> Principal | None:
        return principal_var.get()

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    interceptor = AuthInterceptor(TokenTable(), POLICIES)
    seen: Principal | None = await call(
        interceptor, behavior, DummyContext(metadata=metadata), request, method
    )
    return seen


async def test_an_allowed_role_reaches_the_handler_as_the_caller() -> None:
    assert await _as("admin-token", "/test.v1.Test/AdminOnly") == ADMIN_USER
    assert principal_var.get() is None  # reset after the call


@pytest.mark.parametrize("token", ["service-token", "plain-token"])
async def test_another_role_is_denied(token: str) -> None:
    with pytest.raises(PermissionDenied):
        await _as(token, "/test.v1.Test/AdminOnly")


@pytest.mark.parametrize("token", [None, "forged-token"])
async def test_no_or_an_unknown_token_is_unauthenticated(token: str | None) -> None:
    with pytest.raises(Unauthenticated):
        await _as(token, "/test.v1.Test/AdminOnly")


async def test_the_user_itself_passes_by_the_self_field_and_nobody_else() -> None:
    assert await _as("plain-token", "/test.v1.Test/AdminOrSelf", Request(PLAIN_USER.user_id)) == (
        PLAIN_USER
    )
    with pytest.raises(PermissionDenied):
        await _as("plain-token", "/test.v1.Test/AdminOrSelf", Request(uuid.uuid4()))


class BatchRequest:
    def __init__(self, *user_ids: uuid.UUID | str) -> None:
        self.ids = [str(u) for u in user_ids]


async def test_a_repeated_self_field_passes_only_when_every_entry_is_the_caller() -> None:
    me = PLAIN_USER.user_id
    method = "/test.v1.Test/AdminOrSelfBatch"
    assert await _as("plain-token", method, BatchRequest(me)) == PLAIN_USER
    assert await _as("plain-token", method, BatchRequest(me, me)) == PLAIN_USER
    for request in (
        BatchRequest(me, uuid.uuid4()),
        BatchRequest(uuid.uuid4(), me),
        BatchRequest(),
        BatchRequest(me, "not-an-id"),
    ):
        with pytest.raises(PermissionDenied):
            await _as("plain-token", method, request)
    assert await _as("admin-token", method, BatchRequest(uuid.uuid4())) == ADMIN_USER


async def test_a_method_without_a_policy_is_denied_even_to_an_admin() -> None:
    with pytest.raises(PermissionDenied, match="no access policy"):
        await _as("admin-token", "/test.v1.Test/Undeclared")


async def test_a_public_method_gets_its_handler_unchanged_and_needs_no_token() -> None:
    async def behavior(request: Any, context: Any) -> str:
        return "public"

    interceptor = AuthInterceptor(TokenTable(), POLICIES)
    plain: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return plain

    handler = await interceptor.intercept_service(continuation, CallDetails("/test.v1.Test/Public"))
    assert handler is plain


# --- access log ----------------------------------------------------------------------------


async def test_one_access_log_line_per_call_with_method_and_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok(request: Any, context: Any) -> str:
        return "ok"

    async def fails(request: Any, context: Any) -> None:
        await context.abort_with_status(_status(grpc.StatusCode.NOT_FOUND))

    with caplog.at_level(logging.INFO, logger="usersvc.access"):
        await call(AccessLogInterceptor(), ok, DummyContext(), method="/test.v1.Test/Ok")
        with pytest.raises(grpc.aio.AbortError):
            await call(AccessLogInterceptor(), fails, DummyContext(), method="/test.v1.Test/No")
    lines = [r for r in caplog.records if r.name == "usersvc.access"]
    assert [(r.method, r.code) for r in lines] == [  # type: ignore[attr-defined]
        ("/test.v1.Test/Ok", "OK"),
        ("/test.v1.Test/No", "NOT_FOUND"),
    ]
    assert all(r.peer == "ipv4:127.0.0.1:12345" for r in lines)  # type: ignore[attr-defined]


class _StatusValue(grpc.Status):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.details = code.name
        self.trailing_metadata = ()


def _status(code: grpc.StatusCode) -> grpc.Status:
    return _StatusValue(code)
