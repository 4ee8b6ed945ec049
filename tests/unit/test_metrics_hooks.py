"""Metrics hooks on their own: the hashing queue and the limiters' counter."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc

from usersvc.adapters.password_hasher import Argon2PasswordHasher
from usersvc.metrics import Metrics

AUTH = "userservice.v1.AuthService"
USERS = "userservice.v1.UserService"


async def test_hash_queue_depth_counts_hashes_waiting_for_a_slot() -> None:
    metrics = Metrics()
    hasher = Argon2PasswordHasher(
        time_cost=2,
        memory_kib=19456,
        parallelism=1,
        concurrency=1,
        queue_hooks=metrics.hash_queue_hooks(),
    )
    seen: list[float] = []

    async def watch() -> None:
        while True:
            seen.append(metrics.registry.get_sample_value("usersvc_password_hash_queue_depth") or 0)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(hasher.hash(f"password {i}") for i in range(3)))
    finally:
        watcher.cancel()
        hasher.close()
    assert max(seen) == 2  # one hashing, two waiting
    assert metrics.registry.get_sample_value("usersvc_password_hash_queue_depth") == 0


def test_rate_limit_hook_counts_refusals_per_method_and_limit() -> None:
    metrics = Metrics()
    metrics.count_rate_limited("/userservice.v1.AuthService/Login")
    metrics.count_rate_limited("/userservice.v1.AuthService/Login")
    metrics.count_rate_limited("/userservice.v1.UserService/GetUser", limit="concurrency")
    get = metrics.registry.get_sample_value
    labels = {"grpc_service": AUTH, "grpc_method": "Login", "limit": "rate"}
    assert get("usersvc_rate_limited_total", labels) == 2
    labels = {"grpc_service": USERS, "grpc_method": "GetUser", "limit": "concurrency"}
    assert get("usersvc_rate_limited_total", labels) == 1


async def test_rate_limit_refusals_reach_the_counter() -> None:
    import pytest

    from usersvc.interceptors.rate_limit import RateLimited, RateLimitInterceptor, RateLimits

    metrics = Metrics()
    interceptor = RateLimitInterceptor(
        RateLimits(reads="2/minute", writes="", login_per_peer="", login_per_email=""),
        on_refused=metrics.count_rate_limited,
    )

    async def behavior(request: object, context: object) -> str:
        return "ok"

    class Context:
        def peer(self) -> str:
            return "ipv4:10.0.0.9:5000"

    method = "/userservice.v1.UserService/GetUser"
    limited = interceptor.wrap(method, behavior)
    context = cast(grpc.aio.ServicerContext[Any, Any], Context())
    for _ in range(2):
        assert await limited(object(), context) == "ok"
    with pytest.raises(RateLimited):
        await limited(object(), context)
    labels = {"grpc_service": USERS, "grpc_method": "GetUser", "limit": "read"}
    assert metrics.registry.get_sample_value("usersvc_rate_limited_total", labels) == 1
