"""Running a unit of work again when the database reports a transient conflict."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from usersvc.domain.errors import ConcurrencyConflict, RetryableConflict
from usersvc.services.ports import UnitOfWork, UnitOfWorkFactory

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ATTEMPTS = 4
BASE_DELAY_SECONDS = 0.01


async def in_transaction(
    uow_factory: UnitOfWorkFactory,
    body: Callable[[UnitOfWork], Awaitable[T]],
    *,
    write: bool = True,
    attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `body` in a fresh unit of work; retry serialization failures and deadlocks.

    `body` must commit; it runs again from the start on a retry, so it must not have effects
    outside the transaction. After `attempts` conflicts: ConcurrencyConflict (ABORTED).
    """
    for attempt in range(1, attempts + 1):
        try:
            async with uow_factory(write=write) as uow:
                return await body(uow)
        except RetryableConflict as conflict:
            if attempt == attempts:
                log.warning("giving up after %d transaction conflicts", attempts)
                raise ConcurrencyConflict(
                    "the change conflicted with concurrent changes; retry"
                ) from conflict
            # Full jitter, growing exponentially: conflicting callers spread out.
            await sleep(random.uniform(0, BASE_DELAY_SECONDS * 2**attempt))
    raise AssertionError("unreachable")
