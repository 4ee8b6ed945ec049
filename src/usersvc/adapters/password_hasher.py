"""Argon2id password hashing off the event loop, with bounded concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Argon2PasswordHasher:
    """Hashes and verifies in a small thread pool; argon2-cffi releases the GIL while hashing."""

    def __init__(
        self,
        *,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        concurrency: int,
        queue_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(concurrency)
        # (enqueued, dequeued): told when a hash has to wait for a slot, and when it got one.
        self._queue_hooks = queue_hooks
        # Verified against when an account does not exist, so that path costs the same work.
        self.dummy_hash = self._hasher.hash("usersvc-dummy-password-for-timing")

    async def hash(self, password: str) -> str:
        await self._wait_for_slot()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._hasher.hash, password)
        finally:
            self._slots.release()

    async def verify(self, password_hash: str, password: str) -> bool:
        await self._wait_for_slot()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._verify, password_hash, password)
        finally:
            self._slots.release()

    async def _wait_for_slot(self) -> None:
        hooks = self._queue_hooks
        if hooks is None or not self._slots.locked():
            await self._slots.acquire()
            return
        hooks[0]()
        try:
            await self._slots.acquire()
        finally:
            hooks[1]()

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash is weaker than the current parameters in any respect.

        Never for a stronger one: during a rolling change of settings, replicas would otherwise
        flip hashes back and forth.
        """
        try:
            params = extract_parameters(password_hash)
        except InvalidHashError:
            return True
        current = self._hasher
        return (
            params.type is not Type.ID
            or params.time_cost < current.time_cost
            or params.memory_cost < current.memory_cost
            or params.parallelism < current.parallelism
            or params.hash_len < current.hash_len
            or params.salt_len < current.salt_len
        )

    def allows_password_login(self, password_hash: str) -> bool:
        """Only Argon2 hashes verify passwords; service accounts store a marker instead."""
        return password_hash.startswith("$argon2")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
