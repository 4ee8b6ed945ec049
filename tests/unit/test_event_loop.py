"""The event loop a server process runs on: uvloop by default where installed, or as set."""

from __future__ import annotations

import asyncio

import pytest

from usersvc import event_loop


async def _record(into: list[str]) -> None:
    into.append(event_loop.running_kind())


@pytest.mark.parametrize(
    ("kind", "expected"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_run_uses_the_chosen_loop(kind: event_loop.EventLoopKind, expected: str) -> None:
    seen: list[str] = []
    event_loop.run(_record(seen), kind)
    assert seen == [expected]
    assert event_loop.chosen(kind) == expected
    # The standard policy is left as it was for everything else in this process.
    loop = asyncio.new_event_loop()
    try:
        assert not type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
