"""grpc.health.v1: liveness ("") and readiness (the service names) that follows the database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from grpc_health.v1 import health, health_pb2

from usersvc.adapters.schema_check import SchemaState

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer plus List, which it leaves unimplemented."""

    async def List(  # noqa: N802 (named by the contract)
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in list(self._server_status.items()):
            response.statuses[name].status = status
        return response


class Readiness:
    """Marks `services` SERVING while the database answers at the expected schema, else
    NOT_SERVING. Liveness ("") is left alone: the process can still answer.

    One log line per change of state, naming the cause, not one per check.
    """

    def __init__(
        self,
        servicer: HealthServicer,
        services: Iterable[str],
        check: Callable[[], Awaitable[SchemaState]],
        *,
        interval: float,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._servicer = servicer
        self._close = close
        self._services = tuple(services)
        self._check = check
        self.interval = interval
        self._problem: str | None = "not checked yet"
        # The services start NOT_SERVING (build_server sets them so) until a check passes.
        self.ready = False
        self.ready_event = asyncio.Event()

    async def check_once(self) -> bool:
        try:
            state = await self._check()
        except Exception as err:  # a bug in the check must not leave the replica SERVING
            log.exception("readiness check failed")
            state = SchemaState(f"readiness check failed: {type(err).__name__}")
        ready = state.problem is None
        if state.problem != self._problem:
            if ready:
                log.info("ready", extra={"schema_revision": state.revision})
            else:
                log.warning("not ready: %s", state.problem)
        self._problem = state.problem
        if ready != self.ready:
            for name in self._services:
                await self._servicer.set(name, SERVING if ready else NOT_SERVING)
        self.ready = ready
        if ready:
            self.ready_event.set()
        else:
            self.ready_event.clear()
        return ready

    async def run(self, stopping: asyncio.Event) -> None:
        """Check every `interval` seconds until `stopping` is set."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self.interval)
            except TimeoutError:
                await self.check_once()

    async def close(self) -> None:
        """End what the check may still be doing (a read left to finish on its own)."""
        if self._close is not None:
            await self._close()
