"""Offline verification of usersvc access tokens with the keys of AuthService.GetJwks.

Needs PyJWT: ``pip install 'userservice-api[jwt]'``.

What offline verification cannot see: a token revoked before its ``exp`` (password change,
disabled or deleted user, role change) still verifies here until it expires. Keep access tokens
short-lived (15 minutes by default) and, where a revoked caller must be refused at once, ask
usersvc (any authenticated call, such as GetUser of the caller, fails for a revoked token).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import jwt

from userservice.v1 import auth_service_pb2

# Headers that point at keys elsewhere; honouring them would let a token choose its own key.
_REFUSED_HEADERS = ("jku", "x5u", "jwk", "x5c")


class InvalidToken(Exception):
    """The token is not a valid, current usersvc access token; answer UNAUTHENTICATED."""


class _KeyCache:
    """Keys by kid; refreshed when older than ``max_age`` or on an unknown kid, at most once per
    ``min_refresh_interval`` so that tokens with made-up kids cannot flood usersvc."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithm: str,
        leeway: float,
        min_refresh_interval: float,
        max_age: float,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.algorithm = algorithm
        self.leeway = leeway
        self.min_refresh_interval = min_refresh_interval
        self.max_age = max_age
        self.clock = clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.attempted_at: float | None = None
        self.fetches = 0

    def header(self, token: str) -> str:
        """The kid of a token whose header is acceptable."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidToken("malformed token") from err
        if header.get("alg") != self.algorithm:
            raise InvalidToken(f"algorithm must be {self.algorithm}")
        if any(name in header for name in _REFUSED_HEADERS):
            raise InvalidToken("key-location headers are not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("no kid")
        return kid

    def needs_refresh(self, kid: str) -> bool:
        """Whether to fetch now (and note the attempt): stale or missing keys, rate-limited."""
        now = self.clock()
        if self.attempted_at is not None and now - self.attempted_at < self.min_refresh_interval:
            return False
        stale = self.fetched_at is None or now - self.fetched_at >= self.max_age
        if stale or kid not in self.keys:
            self.attempted_at = now
            return True
        return False

    def store(self, response: auth_service_pb2.GetJwksResponse) -> None:
        self.keys = dict(_parse_keys(response.keys, self.algorithm))
        self.fetched_at = self.clock()
        self.fetches += 1

    def decode(self, token: str, kid: str) -> dict[str, Any]:
        key = self.keys.get(kid)
        if key is None:
            raise InvalidToken("unknown kid")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as err:
            raise InvalidToken(str(err)) from err
        if claims.get("typ") != "access":
            raise InvalidToken("not an access token")
        return claims


def _parse_keys(
    keys: Iterable[auth_service_pb2.Jwk], algorithm: str
) -> Iterable[tuple[str, jwt.PyJWK]]:
    for k in keys:
        if k.alg != algorithm:
            continue
        jwk = {"kty": k.kty, "crv": k.crv, "kid": k.kid, "alg": k.alg, "use": k.use}
        jwk.update(x=k.x, y=k.y)
        yield k.kid, jwt.PyJWK(jwk, algorithm=algorithm)


class JwksVerifier:
    """Verifies access tokens offline: ``JwksVerifier(client.get_jwks).verify(token)``.

    The algorithm (ES256), issuer and audience are pinned; ``exp``, ``iat``, ``iss``, ``aud``
    and ``sub`` are required and ``typ`` must be "access". Returns the claims: ``sub`` (user
    id), ``roles``, ``exp``. Raises ``InvalidToken``. Thread-safe.
    """

    def __init__(
        self,
        fetch: Callable[[], auth_service_pb2.GetJwksResponse],
        *,
        issuer: str = "usersvc",
        audience: str = "usersvc",
        algorithm: str = "ES256",
        leeway: float = 30.0,
        min_refresh_interval: float = 30.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._cache = _KeyCache(
            issuer=issuer,
            audience=audience,
            algorithm=algorithm,
            leeway=leeway,
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            clock=clock,
        )
        self._lock = threading.Lock()

    @property
    def fetches(self) -> int:
        """How often the keys were fetched."""
        return self._cache.fetches

    def verify(self, token: str) -> dict[str, Any]:
        kid = self._cache.header(token)
        with self._lock:
            if self._cache.needs_refresh(kid):
                try:
                    self._cache.store(self._fetch())
                except Exception as err:  # keep the old keys; retry after the interval
                    if not self._cache.keys:
                        raise InvalidToken("no verification keys available") from err
        return self._cache.decode(token, kid)


class AsyncJwksVerifier:
    """``JwksVerifier`` for asyncio: ``await AsyncJwksVerifier(client.get_jwks).verify(token)``."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[auth_service_pb2.GetJwksResponse]],
        *,
        issuer: str = "usersvc",
        audience: str = "usersvc",
        algorithm: str = "ES256",
        leeway: float = 30.0,
        min_refresh_interval: float = 30.0,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._cache = _KeyCache(
            issuer=issuer,
            audience=audience,
            algorithm=algorithm,
            leeway=leeway,
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            clock=clock,
        )
        self._lock = asyncio.Lock()

    @property
    def fetches(self) -> int:
        return self._cache.fetches

    async def verify(self, token: str) -> dict[str, Any]:
        kid = self._cache.header(token)
        async with self._lock:
            if self._cache.needs_refresh(kid):
                try:
                    self._cache.store(await self._fetch())
                except Exception as err:  # keep the old keys; retry after the interval
                    if not self._cache.keys:
                        raise InvalidToken("no verification keys available") from err
        return self._cache.decode(token, kid)
