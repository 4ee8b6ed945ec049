"""A body that is not a valid protobuf of the method's request type answers INVALID_ARGUMENT
with the usual details and request id, logged as one WARNING line without a traceback.

grpc decodes the body before any interceptor's behaviour runs, and a decoding error there
becomes UNKNOWN plus an ERROR traceback per call. So the method's deserializer is wrapped: it
hands a marker to the behaviour instead of raising, and the behaviour refuses the marker.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, cast

import grpc

from usersvc.domain.errors import FieldViolation, ValidationFailed
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
    checked_first,
)

log = logging.getLogger(__name__)


class MalformedRequest:
    """What the wrapped deserializer returns for bytes that do not decode."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as err:  # DecodeError, or anything else the parser raises
            return MalformedRequest(type(err).__name__)

    return decode


class MalformedRequestInterceptor(UnaryWrappingInterceptor):
    def handler_for(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        stream = handler.unary_stream
        if (
            stream is not None
            and inspect.isasyncgenfunction(stream)
            and handler.request_deserializer is not None
        ):
            return grpc.unary_stream_rpc_method_handler(
                self.wrap_stream(method, cast(StreamBehavior, stream)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        # grpc.aio handlers are coroutine functions; the stubs type them as sync.
        behavior = self.wrap(method, cast(UnaryBehavior, handler.unary_unary))
        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            _refuse_malformed(method, request)

        return checked_first(behavior, check)

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _refuse_malformed(method, request)
            return await behavior(request, context)

        return checked


def _refuse_malformed(method: str, request: Any) -> None:
    if isinstance(request, MalformedRequest):
        log.warning("malformed request body", extra={"method": method, "error": request.error})
        raise ValidationFailed(
            [
                FieldViolation(
                    "body",
                    "the request body is not a valid protobuf message of this method",
                    "MALFORMED_REQUEST",
                )
            ],
            reason="MALFORMED_REQUEST",
        )
