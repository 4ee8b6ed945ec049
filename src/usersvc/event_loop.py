"""The event loop a server process runs on.

uvloop (libuv) runs the same asyncio code with less work per loop iteration than the standard
loop; every call the server answers goes through a few iterations, so a GetUser costs about
8% less CPU on it (measured with h2load against the same server on both loops). grpc.aio,
asyncpg, psycopg and aiosqlite all run on it unchanged. "auto" uses it where it is installed
(it is a dependency everywhere but Windows, which it does not support).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, Literal

EventLoopKind = Literal["auto", "uvloop", "asyncio"]


def chosen(kind: EventLoopKind) -> Literal["uvloop", "asyncio"]:
    if kind == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return kind


def run(main: Coroutine[Any, Any, None], kind: EventLoopKind) -> None:
    """asyncio.run on the chosen loop."""
    if chosen(kind) == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)


def running_kind() -> str:
    """ "uvloop" or "asyncio": the loop this coroutine runs on."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
