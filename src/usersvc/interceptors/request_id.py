"""Request ids: taken from a sane x-request-id, else a new UUID; echoed in the trailers."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from usersvc.context import request_id_var
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
)

REQUEST_ID_KEY = "x-request-id"
_SANE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def pick_request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE.match(value):
            return value
    return str(uuid.uuid4())


async def _unimplemented(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    from usersvc.interceptors.errors import build_status

    token = request_id_var.set(pick_request_id(context.invocation_metadata()))
    try:
        await context.abort_with_status(
            build_status(grpc.StatusCode.UNIMPLEMENTED, "unknown method", "UNIMPLEMENTED")
        )
    finally:
        request_id_var.reset(token)


# Answers any method this server does not have, with the usual details and request id; the
# body is never decoded.
UNIMPLEMENTED_HANDLER: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
    _unimplemented
)


class RequestIdInterceptor(UnaryWrappingInterceptor):
    def handler_for_unknown(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        return UNIMPLEMENTED_HANDLER

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def with_request_id(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = pick_request_id(context.invocation_metadata())
            token = request_id_var.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            try:
                return await behavior(request, context)
            finally:
                request_id_var.reset(token)

        return with_request_id

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def with_request_id(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            request_id = pick_request_id(context.invocation_metadata())
            request_id_var.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            async for response in behavior(request, context):
                yield response

        return with_request_id
