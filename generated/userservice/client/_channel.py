"""Channel settings shared by the sync and asyncio clients: retries, deadlines, keepalive."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_ATTEMPTS = 4
INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 2.0
BACKOFF_MULTIPLIER = 2.0

_USERS = "userservice.v1.UserService"
_AUTH = "userservice.v1.AuthService"

# Calls that change nothing, so repeating one after UNAVAILABLE is safe. CreateUser and
# BatchCreateUsers are safe only with a request_id, which a service config cannot see: the
# clients retry them themselves. Login, RefreshToken and Logout are never retried (a replayed
# refresh token revokes the login); nor are the calls that mail or redeem a one-time code.
IDEMPOTENT_METHODS = (
    (_USERS, "GetUser"),
    (_USERS, "BatchGetUsers"),
    (_USERS, "ListUsers"),
    (_USERS, "ListAuditEvents"),
    (_AUTH, "GetJwks"),
    ("grpc.health.v1.Health", "Check"),
)

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": f"{INITIAL_BACKOFF_SECONDS}s",
    "maxBackoff": f"{MAX_BACKOFF_SECONDS}s",
    "backoffMultiplier": BACKOFF_MULTIPLIER,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The gRPC service config: retries for idempotent calls, a deadline for every call but
    the change feed's."""
    timeout = f"{timeout_seconds:.3f}s"
    return {
        "methodConfig": [
            {
                "name": [{"service": s, "method": m} for s, m in IDEMPOTENT_METHODS],
                "timeout": timeout,
                "retryPolicy": RETRY_POLICY,
            },
            {"name": [{"service": _USERS}, {"service": _AUTH}], "timeout": timeout},
            # The change feed stays open: no deadline of its own (a per-call one still applies).
            {"name": [{"service": _USERS, "method": "WatchUserEvents"}]},
        ],
        # Retries pause while most recent calls fail (each failure costs 1 of 10 tokens, each
        # success returns 0.1; below 5 tokens nothing is retried), so an outage is not multiplied.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


# gRPC servers police client pings; a ping the policy forbids is a strike, and after two the
# server closes the connection (GOAWAY, too_many_pings). usersvc allows one every 10 s, idle or
# not (USERSVC_KEEPALIVE_MIN_CLIENT_PING_INTERVAL_SECONDS), and pings idle clients itself; gRPC's
# default policy, which a proxy in between may keep, allows one every 5 minutes and none while
# no call is open. The client keeps to the stricter one: it pings only while a call is open, at
# most every 5 minutes, and gives up on a silent connection after 20 seconds.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


def channel_options(
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Options for grpc.secure_channel/insecure_channel; `extra` comes last and wins."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(timeout_seconds))),
        *KEEPALIVE_OPTIONS,
        *extra,
    ]


def backoff_seconds(attempt: int, retry_delay: float | None) -> float:
    """Sleep before retry number `attempt` (1-based): exponential with full jitter, or the
    server's RetryInfo delay when it asks for longer, capped at MAX_BACKOFF_SECONDS."""
    exponential = INITIAL_BACKOFF_SECONDS * BACKOFF_MULTIPLIER ** (attempt - 1)
    ceiling = min(MAX_BACKOFF_SECONDS, exponential)
    delay = random.uniform(0, ceiling)
    if retry_delay is not None:
        delay = max(delay, min(retry_delay, MAX_BACKOFF_SECONDS))
    return delay
