"""One JSON access-log line per RPC: method, code, duration, request id, peer."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from usersvc.interceptors.base import UnaryBehavior, UnaryWrappingInterceptor

log = logging.getLogger("usersvc.access")


class AccessLogInterceptor(UnaryWrappingInterceptor):
    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def logged(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if log.isEnabledFor(logging.INFO):
                    log.info(
                        "rpc",
                        extra={
                            "method": method,
                            "code": code.name,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                            "peer": context.peer(),
                        },
                    )

        return logged
