"""The interceptor concerns around a server-streaming method (WatchUserEvents' shape)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from tests.unit.test_interceptors import (
    ADMIN_USER,
    POLICIES,
    CallDetails,
    DummyContext,
    TokenTable,
    details_of,
)
from userservice.v1 import user_service_pb2 as pb
from usersvc.context import principal_var, request_id_var
from usersvc.domain.errors import (
    PermissionDenied,
    ShuttingDown,
    StreamShutDown,
    Unauthenticated,
    ValidationFailed,
)
from usersvc.interceptors import auth as auth_module
from usersvc.interceptors.auth import AuthInterceptor, MethodPolicy
from usersvc.interceptors.base import InterceptorChain, UnaryWrappingInterceptor
from usersvc.interceptors.errors import RESUME_TOKEN_KEY, ErrorInterceptor
from usersvc.interceptors.input_check import InputCheckInterceptor
from usersvc.interceptors.request_id import REQUEST_ID_KEY, RequestIdInterceptor
from usersvc.interceptors.shutdown_gate import ShutdownGateInterceptor

STREAM = "/test.v1.Test/Watch"
STREAM_POLICIES = {
    **POLICIES,
    STREAM: MethodPolicy(public=False, roles=frozenset({"admin"}), self_field=()),
}
Stream = Callable[[Any, Any], AsyncIterator[Any]]


async def stream_handler(
    interceptor: UnaryWrappingInterceptor | InterceptorChain, method: str, behavior: Stream
) -> grpc.RpcMethodHandler[Any, Any]:
    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_stream_rpc_method_handler(behavior)

    handler = await interceptor.intercept_service(continuation, CallDetails(method))
    assert handler is not None
    return handler


async def collect(
    interceptor: UnaryWrappingInterceptor | InterceptorChain,
    behavior: Stream,
    context: DummyContext,
    *,
    method: str = STREAM,
    request: Any = None,
    limit: int | None = None,
) -> list[Any]:
    handler = await stream_handler(interceptor, method, behavior)
    assert handler.unary_stream is not None
    out: list[Any] = []
    stream = handler.unary_stream(request, context)  # type: ignore[arg-type]
    async for item in stream:  # type: ignore[attr-defined]
        out.append(item)
        if limit is not None and len(out) >= limit:
            await stream.aclose()  # type: ignore[attr-defined]
            break
    return out


def admin() -> DummyContext:
    return DummyContext(metadata=(("authorization", "Bearer admin-token"),))


async def test_a_stream_is_admitted_by_its_policy_before_its_first_message() -> None:
    started: list[bool] = []

    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        started.append(True)
        yield principal_var.get()
        yield "second"

    interceptor = AuthInterceptor(TokenTable(), STREAM_POLICIES)
    assert await collect(interceptor, behavior, admin()) == [ADMIN_USER, "second"]
    for token, error in (
        (None, Unauthenticated),
        ("forged", Unauthenticated),
        ("service-token", PermissionDenied),
    ):
        started.clear()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with pytest.raises(error):
            await collect(interceptor, behavior, DummyContext(metadata=metadata))
        assert started == [], "the stream began before its caller was admitted"


async def test_a_stream_without_a_policy_is_denied() -> None:
    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        yield "never"

    handler = await stream_handler(
        AuthInterceptor(TokenTable(), STREAM_POLICIES), "/test.v1.Test/Undeclared", behavior
    )
    assert handler.unary_unary is not None
    with pytest.raises(PermissionDenied):
        await handler.unary_unary(None, admin())  # type: ignore[arg-type]


async def test_an_open_stream_ends_unauthenticated_once_its_token_is_revoked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth_module, "STREAM_RECHECK_SECONDS", 0.01)
    revoked = False
    closed = asyncio.Event()

    class Revocable(TokenTable):
        async def authenticate(self, authorization: str | None) -> Any:
            if revoked:
                raise Unauthenticated()
            return await super().authenticate(authorization)

    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            yield "first"
            await asyncio.Event().wait()  # nothing more to send, for ever
            yield "never"
        finally:
            closed.set()

    handler = await stream_handler(AuthInterceptor(Revocable(), STREAM_POLICIES), STREAM, behavior)
    assert handler.unary_stream is not None
    stream = handler.unary_stream(None, admin())  # type: ignore[arg-type]
    assert await anext(stream) == "first"  # type: ignore[call-overload]
    revoked = True
    with pytest.raises(Unauthenticated):
        await anext(stream)  # type: ignore[call-overload]
    assert closed.is_set(), "the inner stream was left open"


async def test_a_stream_error_keeps_its_resume_token_in_the_details_and_a_trailer() -> None:
    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        yield "first"
        raise StreamShutDown(resume_token="token-42")

    context = DummyContext()
    request_id_var.set("req-1")
    with pytest.raises(grpc.aio.AbortError):
        await collect(ErrorInterceptor(), behavior, context)
    assert context.aborted is not None
    assert context.aborted.code is grpc.StatusCode.UNAVAILABLE
    details = details_of(context.aborted)
    assert details["ErrorInfo"].reason == "SHUTTING_DOWN"
    assert details["ErrorInfo"].metadata["resume_token"] == "token-42"
    assert details["RequestInfo"].request_id == "req-1"
    assert (RESUME_TOKEN_KEY, "token-42") in context.aborted.trailing_metadata
    assert (REQUEST_ID_KEY, "req-1") in context.aborted.trailing_metadata


async def test_a_stream_gets_a_request_id_echoed_in_its_trailers() -> None:
    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        yield request_id_var.get()

    context = DummyContext(metadata=((REQUEST_ID_KEY, "watch-7"),))
    assert await collect(RequestIdInterceptor(), behavior, context) == ["watch-7"]
    assert context.trailers == ((REQUEST_ID_KEY, "watch-7"),)


async def test_a_closed_gate_and_bad_input_refuse_a_stream_before_it_starts() -> None:
    async def behavior(request: Any, context: Any) -> AsyncIterator[Any]:
        yield "started"

    gate = ShutdownGateInterceptor()
    assert await collect(gate, behavior, DummyContext()) == ["started"]
    gate.close()
    with pytest.raises(ShuttingDown):
        await collect(gate, behavior, DummyContext())

    with pytest.raises(ValidationFailed):
        await collect(
            InputCheckInterceptor(),
            behavior,
            DummyContext(),
            request=pb.WatchUserEventsRequest(after="bad\x00token"),
        )


async def test_streams_written_through_the_context_pass_through_unchanged() -> None:
    # grpc's health Watch writes with context.write instead of yielding.
    async def watch(request: Any, context: Any) -> None:
        return None

    plain: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(watch)

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return plain

    chain = InterceptorChain(
        [RequestIdInterceptor(), ErrorInterceptor(), ShutdownGateInterceptor()]
    )
    handler = await chain.intercept_service(
        continuation, CallDetails("/grpc.health.v1.Health/Watch")
    )
    assert handler is plain
