"""Argon2id password hashing off the event loop, with bounded concurrency and a bounded queue.

New hashes are always Argon2id. Verification also accepts the imported formats of
domain.password_hashes (bcrypt, PBKDF2-SHA256, other Argon2 variants), each verified by a
maintained library: argon2-cffi, bcrypt, and the standard library's hashlib and hmac.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import bcrypt
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from usersvc.domain.errors import Overloaded
from usersvc.domain.password_hashes import (
    HashFormatError,
    HashScheme,
    ParsedHash,
    parse_password_hash,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Hashing threads run this much nicer than the process (Linux): the event loop's thread, at the
# process's own priority, gets a core whenever it has work, and hashes take whatever CPU is
# left - all of it when nothing else runs. Reserving a core instead would halve hashing on a
# 2-core machine.
HASH_THREAD_NICENESS = 10
# What a refused caller is told to wait: about the time the queue takes to move on.
OVERLOADED_RETRY_SECONDS = 1.0
# bcrypt reads at most 72 bytes of a password; the systems that made imported bcrypt hashes
# ignored the rest, so verification does too (the bcrypt package refuses longer input).
BCRYPT_MAX_PASSWORD_BYTES = 72


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _lower_thread_priority() -> None:
    # On Linux a thread has its own nice value, set through its thread id. Elsewhere the id
    # is no process id, so nothing is changed there.
    if sys.platform != "linux":  # pragma: no cover
        return
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + HASH_THREAD_NICENESS))
    except OSError as err:  # pragma: no cover - a sandbox may forbid it; hashing still works
        log.warning("could not lower the hashing threads' priority: %s", err)


class Argon2PasswordHasher:
    """Hashes and verifies in a thread pool; argon2-cffi releases the GIL while hashing.

    `concurrency` hashes run at once (0: one per usable core) in threads of lower priority
    than the event loop; up to `queue_limit` more wait for a slot, and beyond that a call is
    refused at once with Overloaded (RESOURCE_EXHAUSTED with RetryInfo) rather than stalling.
    """

    def __init__(
        self,
        *,
        time_cost: int,
        memory_kib: int,
        parallelism: int,
        concurrency: int = 0,
        queue_limit: int = 64,
        queue_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=Type.ID,
        )
        self.concurrency = concurrency or usable_cores()
        self._pool = ThreadPoolExecutor(
            max_workers=self.concurrency,
            thread_name_prefix="argon2",
            initializer=_lower_thread_priority,
        )
        self._slots = asyncio.Semaphore(self.concurrency)
        self._queue_limit = queue_limit
        self._waiting = 0
        # (enqueued, dequeued): told when a hash has to wait for a slot, and when it got one.
        self._queue_hooks = queue_hooks
        # Verified against when an account does not exist, so that path costs the same work.
        self.dummy_hash = self._hasher.hash("usersvc-dummy-password-for-timing")

    async def _run(self, work: Callable[..., T], *args: str) -> T:
        if self._slots.locked():
            if self._waiting >= self._queue_limit:
                raise Overloaded(
                    "too many password hashes queued; retry later",
                    retry_after=OVERLOADED_RETRY_SECONDS,
                )
            self._waiting += 1
            hooks = self._queue_hooks
            if hooks is not None:
                hooks[0]()
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
                if hooks is not None:
                    hooks[1]()
        else:
            await self._slots.acquire()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)
        finally:
            self._slots.release()

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        return await self._run(self._verify, password_hash, password)

    def _verify(self, password_hash: str, password: str) -> bool:
        if password_hash.startswith("$argon2"):
            return self._verify_argon2(password_hash, password)
        try:
            parsed = parse_password_hash(password_hash)
        except HashFormatError:
            return False
        return verify_imported(parsed, password_hash, password)

    def _verify_argon2(self, password_hash: str, password: str) -> bool:
        # argon2-cffi reads the variant (id, i, d) and the parameters from the hash itself.
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash is weaker than the current parameters in any respect.

        Never for a stronger one: during a rolling change of settings, replicas would otherwise
        flip hashes back and forth. Any other format (an imported bcrypt or PBKDF2 hash)
        always needs one.
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
        """Argon2 hashes and the imported formats verify passwords; service accounts store a
        marker instead."""
        if password_hash.startswith("$argon2"):
            return True
        try:
            parse_password_hash(password_hash)
        except HashFormatError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def verify_imported(parsed: ParsedHash, password_hash: str, password: str) -> bool:
    """Verify a password against an imported hash (blocking; run it in the pool)."""
    secret = password.encode()
    if parsed.scheme is HashScheme.BCRYPT:
        try:
            return bcrypt.checkpw(secret[:BCRYPT_MAX_PASSWORD_BYTES], password_hash.encode())
        except ValueError:
            return False
    if parsed.scheme in (HashScheme.PBKDF2_SHA256, HashScheme.DJANGO_PBKDF2_SHA256):
        derived = hashlib.pbkdf2_hmac(
            "sha256", secret, parsed.salt, parsed.iterations, dklen=len(parsed.digest)
        )
        return hmac.compare_digest(derived, parsed.digest)
    return False
