"""After SIGTERM, new calls are refused with UNAVAILABLE (and RetryInfo) while in-flight ones
finish, so that a client never sees CANCELLED from a server that is merely going away."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from usersvc.domain.errors import ShuttingDown
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
    checked_first,
)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ShutdownGateInterceptor(UnaryWrappingInterceptor):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self._last_refusal = 0.0

    def close(self) -> None:
        self.closed = True
        self._last_refusal = time.monotonic()

    async def wait_quiet(self, quiet: float, *, limit: float) -> None:
        """Return once no call was refused for `quiet` seconds, or after `limit` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if time.monotonic() - self._last_refusal >= quiet:
                return
            await asyncio.sleep(quiet / 4)

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        if method.startswith(HEALTH_PREFIX):
            # Probes must keep seeing NOT_SERVING, not an error, until the listener closes.
            return behavior

        async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self.closed:
                self._last_refusal = time.monotonic()
                raise ShuttingDown()
            return await behavior(request, context)

        return gated

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def gate(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if self.closed:
                self._last_refusal = time.monotonic()
                raise ShuttingDown()

        return checked_first(behavior, gate)
