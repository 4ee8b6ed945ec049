"""Rate limits per caller and per method class, in this process (each replica counts alone).

The caller is the token's subject when there is one, else the peer's address. Every call that
verifies a secret of one account (Login; ChangePassword with current_password; the one-time
codes of VerifyEmail and RecoverPassword) is also limited per account and peer together, so
that guessing one account's secret is slow from any one source.
Excess calls answer RESOURCE_EXHAUSTED with RetryInfo saying when the window frees up.
Counting uses the `limits` library's sliding-window counters in memory, in a storage that
never starts a thread (see SweptMemoryStorage).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from usersvc.context import principal_var
from usersvc.domain.errors import ResourceExhausted
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
    checked_first,
)

READ, WRITE, LOGIN = "read", "write", "login"
# Methods outside this table and not exempt count as writes: the stricter class.
METHOD_CLASSES: Mapping[str, str] = {
    "/userservice.v1.UserService/GetUser": READ,
    # One call, one read: a batch costs the database one statement (at most 1,000 ids).
    "/userservice.v1.UserService/BatchGetUsers": READ,
    "/userservice.v1.UserService/ListUsers": READ,
    "/userservice.v1.UserService/ListAuditEvents": READ,
    # Counted once, when the stream starts.
    "/userservice.v1.UserService/WatchUserEvents": READ,
    "/userservice.v1.AuthService/GetJwks": READ,
    "/userservice.v1.AuthService/Login": LOGIN,
    "/userservice.v1.AuthService/RefreshToken": LOGIN,
}
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
LOGIN_METHOD = "/userservice.v1.AuthService/Login"
CHANGE_PASSWORD_METHOD = "/userservice.v1.UserService/ChangePassword"
VERIFY_EMAIL_METHOD = "/userservice.v1.UserService/VerifyEmail"
RECOVER_PASSWORD_METHOD = "/userservice.v1.UserService/RecoverPassword"
# Methods that check a secret of one account, and the request field naming the account: each
# is also limited per account and peer together (the login_per_email limit). ChangePassword
# only when it carries a current_password.
ACCOUNT_FIELDS: Mapping[str, str] = {
    LOGIN_METHOD: "email",
    CHANGE_PASSWORD_METHOD: "id",
    VERIFY_EMAIL_METHOD: "user_id",
    RECOVER_PASSWORD_METHOD: "user_id",
}
MAX_KEY_CHARS = 320
SWEEP_SECONDS = 1.0


class SweptMemoryStorage(MemoryStorage):
    """`limits`' in-memory storage without its expiry thread.

    MemoryStorage starts a new `threading.Timer` on almost every hit to drop expired keys;
    starting a thread blocks the event loop until the thread runs, which cost about a tenth
    of a GetUser call under load. Expired counters are already dropped when they are read, so
    expiry here only bounds memory: keys nobody reads again are swept inline, at most once a
    second, by the call that notices the second has passed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timer.cancel()  # the one MemoryStorage.__init__ started
        self._next_sweep = time.monotonic() + SWEEP_SECONDS

    # Replaces MemoryStorage.__schedule_expiry (a private, name-mangled method it calls on
    # every hit); a unit test fails if a `limits` release stops calling it by this name.
    def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_SECONDS
            self.sweep()

    def sweep(self) -> None:
        """Drop every counter whose window has passed."""
        now = time.time()
        for key, expiry in list(self.expirations.items()):
            if expiry <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


class RateLimited(ResourceExhausted):
    reason = "RATE_LIMITED"


@dataclass(frozen=True)
class RateLimits:
    """Each a `limits` string ("100/second; 1000/minute"); empty: no limit."""

    reads: str
    writes: str
    login_per_peer: str
    login_per_email: str

    def parsed(self) -> dict[str, list[RateLimitItem]]:
        return {
            READ: parse_many(self.reads) if self.reads else [],
            WRITE: parse_many(self.writes) if self.writes else [],
            LOGIN: parse_many(self.login_per_peer) if self.login_per_peer else [],
            "email": parse_many(self.login_per_email) if self.login_per_email else [],
        }


def peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.1:5000" -> "10.0.0.1"; "ipv6:[::1]:5000" -> "::1"; others unchanged."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    """Whom a limit counts: the token's subject, else the peer's host; and that host."""
    principal = principal_var.get()
    peer = peer_host(context.peer() or "")
    return (f"user:{principal.user_id}" if principal is not None else f"peer:{peer}"), peer


def method_class(method: str) -> str | None:
    if method.startswith(EXEMPT_PREFIXES):
        return None
    return METHOD_CLASSES.get(method, WRITE)


class RateLimitInterceptor(UnaryWrappingInterceptor):
    def __init__(
        self, limits: RateLimits, *, on_refused: Callable[[str, str], None] | None = None
    ) -> None:
        super().__init__()
        self._items = limits.parsed()
        self._limiter = SlidingWindowCounterRateLimiter(SweptMemoryStorage())
        # Told (method, limit) of every refusal; metrics count them.
        self._on_refused = on_refused

    def _take(self, method: str, limit: str, items: list[RateLimitItem], *key: str) -> None:
        for item in items:
            if not self._limiter.hit(item, *key):
                if self._on_refused is not None:
                    self._on_refused(method, limit)
                reset_time, _ = self._limiter.get_window_stats(item, *key)
                raise RateLimited(
                    f"rate limit of {item} exceeded; retry later",
                    retry_after_seconds=max(0.001, reset_time - time.time()),
                )

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        kind = method_class(method)
        items = self._items[kind] if kind is not None else []
        account_field = ACCOUNT_FIELDS.get(method)
        email_items = self._items["email"] if account_field else []
        checks_password_only = method == CHANGE_PASSWORD_METHOD
        if not items and not email_items:
            return behavior
        take = self._take

        async def limited(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller, peer = _caller(context)
            take(method, kind or WRITE, items, kind or WRITE, caller)
            if email_items and (not checks_password_only or request.current_password):
                account = str(getattr(request, account_field or "email", ""))
                key = account[:MAX_KEY_CHARS].strip().lower()
                take(method, "account", email_items, "account", key, peer)
            return await behavior(request, context)

        return limited

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior | None:
        kind = method_class(method)
        items = self._items[kind] if kind is not None else []
        if not items:
            return None
        take = self._take

        async def limit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            caller, _ = _caller(context)
            take(method, kind or WRITE, items, kind or WRITE, caller)

        return checked_first(behavior, limit)
