"""The hashing pool: bounded concurrency, a bounded queue, and refusal beyond it."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from typing import Any

import pytest

from usersvc.adapters.password_hasher import HASH_THREAD_NICENESS, Argon2PasswordHasher
from usersvc.domain.errors import Overloaded

# The OWASP minimum the settings allow; each hash takes tens of milliseconds.
PARAMS: dict[str, Any] = {"time_cost": 2, "memory_kib": 19456, "parallelism": 1}


async def test_hashes_beyond_the_running_and_the_queued_are_refused_at_once() -> None:
    hasher = Argon2PasswordHasher(**PARAMS, concurrency=1, queue_limit=2)
    try:
        calls = [asyncio.create_task(hasher.hash(f"password number {i}")) for i in range(5)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        hasher.close()
    refused = [r for r in results if isinstance(r, Overloaded)]
    hashed = [r for r in results if isinstance(r, str)]
    # One runs, two wait, two are refused (with a retry delay), none fails otherwise.
    assert (len(hashed), len(refused)) == (3, 2)
    assert all(r.retry_after > 0 for r in refused)
    assert all(h.startswith("$argon2id$") for h in hashed)


async def test_verify_queues_on_the_same_slots_and_still_answers() -> None:
    hasher = Argon2PasswordHasher(**PARAMS, concurrency=1, queue_limit=0)
    try:
        stored = await hasher.hash("correct horse battery")
        first = asyncio.create_task(hasher.verify(stored, "correct horse battery"))
        await asyncio.sleep(0)  # the first call holds the only slot
        with pytest.raises(Overloaded):
            await hasher.verify(stored, "wrong")
        assert await first is True
        assert await hasher.verify(stored, "wrong") is False
    finally:
        hasher.close()


def test_the_default_concurrency_is_one_per_usable_core() -> None:
    hasher = Argon2PasswordHasher(**PARAMS)
    try:
        assert hasher.concurrency == len(os.sched_getaffinity(0))
    finally:
        hasher.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
async def test_hashing_threads_run_below_the_event_loop_priority() -> None:
    hasher = Argon2PasswordHasher(**PARAMS, concurrency=1)
    seen: list[tuple[int, int]] = []
    try:

        def niceness() -> str:
            seen.append(
                (
                    os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                    os.getpriority(os.PRIO_PROCESS, os.getpid()),
                )
            )
            return "done"

        assert await hasher._run(niceness) == "done"
    finally:
        hasher.close()
    hash_thread, main_thread = seen[0]
    assert hash_thread == min(19, main_thread + HASH_THREAD_NICENESS) > main_thread
