"""A server interceptor that wraps each unary method's behaviour once and caches the result."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
# A server-streaming method of ours: an async generator function of (request, context).
StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


class UnaryWrappingInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses implement `wrap`; the wrapped handler is built once per method, not per call.

    Caching is safe because every per-call decision happens inside the wrapper, which sees the
    call's metadata and context. Server-streaming methods written as async generators (ours,
    WatchUserEvents) go through `wrap_stream`; other streaming handlers (health Watch, which
    writes through its context, and reflection, bidirectional) pass through.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        raise NotImplementedError

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior | None:
        """The server-streaming behaviour with this concern around it (an async generator
        function too); None leaves the method as it is."""
        return None

    def handler_for_unknown(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler answering a method no service has; None leaves it to grpc."""
        return None

    def handler_for(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to serve `method` with, built once; by default `wrap` around unary
        behaviour, `wrap_stream` around async-generator server streams, other streaming
        handlers unchanged."""
        if handler.unary_unary is None:
            stream = handler.unary_stream
            if stream is None or not inspect.isasyncgenfunction(stream):
                return handler
            wrapped = self.wrap_stream(method, cast(StreamBehavior, stream))
            return handler if wrapped is None else rebuild_stream(handler, wrapped)
        # grpc.aio handlers are coroutine functions; the stubs type them as sync.
        return rebuild(handler, self.wrap(method, cast(UnaryBehavior, handler.unary_unary)))

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        # Unknown methods are not cached, so callers cannot grow the cache without bound.
        if handler is None:
            return self.handler_for_unknown(method)
        built = self.handler_for(method, handler)
        self._handlers[method] = built
        return built


class InterceptorChain(grpc.aio.ServerInterceptor):
    """Several concerns served as one grpc interceptor: each method's handler is built once
    by letting every concern wrap it (outermost first, as a list of interceptors would run),
    and cached.

    grpc.aio awaits every registered interceptor's intercept_service on every call; as one
    chain a call costs one such await and one dictionary lookup, however many concerns there
    are. Each concern stays its own class in its own module, testable alone.
    """

    def __init__(self, concerns: Sequence[UnaryWrappingInterceptor]) -> None:
        self._concerns = tuple(concerns)
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        # Unknown methods are not cached, so callers cannot grow the cache without bound;
        # the outermost concern with an answer for them gives it.
        if handler is None:
            for concern in self._concerns:
                fallback = concern.handler_for_unknown(method)
                if fallback is not None:
                    return fallback
            return None
        for concern in reversed(self._concerns):
            handler = concern.handler_for(method, handler)
        self._handlers[method] = handler
        return handler


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Awaitable[Any]]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler with `handler`'s (de)serialisers around other behaviour."""
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def rebuild_stream(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: StreamBehavior
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming handler with `handler`'s (de)serialisers around other behaviour."""
    return grpc.unary_stream_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def checked_first(
    behavior: StreamBehavior, check: Callable[[Any, Context], Awaitable[None]]
) -> StreamBehavior:
    """`behavior` after `check` passed, before the first message."""

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        await check(request, context)
        async for response in behavior(request, context):
            yield response

    return stream
