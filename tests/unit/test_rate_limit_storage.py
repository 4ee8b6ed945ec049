"""The rate limiter's in-memory storage: same counting as `limits`, no thread per hit."""

from __future__ import annotations

import threading
import time

import pytest
from limits import parse
from limits.strategies import SlidingWindowCounterRateLimiter

from usersvc.interceptors import rate_limit
from usersvc.interceptors.rate_limit import SweptMemoryStorage


def test_hits_start_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = SweptMemoryStorage()
    starts: list[threading.Thread] = []
    real_start = threading.Thread.start

    def counting_start(thread: threading.Thread) -> None:
        starts.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = parse("1000000/second")
    for i in range(100):
        assert limiter.hit(item, "read", f"user:{i % 7}")
        time.sleep(0.0005)  # longer, all told, than the library's 10 ms expiry timer
    assert not starts, "a hit started a thread: limits no longer calls the replaced method"


def test_it_still_limits_and_reports_the_window() -> None:
    limiter = SlidingWindowCounterRateLimiter(SweptMemoryStorage())
    item = parse("3/minute")
    assert [limiter.hit(item, "k") for _ in range(4)] == [True, True, True, False]
    reset, remaining = limiter.get_window_stats(item, "k")
    assert remaining == 0 and reset > time.time()
    assert limiter.hit(item, "other key")


def test_expired_keys_are_swept_once_the_sweep_interval_passes() -> None:
    storage = SweptMemoryStorage()
    storage.incr("short", expiry=0.01)
    storage.incr("long", expiry=3600)
    time.sleep(0.02)
    storage._next_sweep = time.monotonic() - 1  # the sweep interval has passed
    storage.incr("trigger", expiry=3600)
    assert "short" not in storage.storage and "short" not in storage.expirations
    assert storage.storage["long"] == 1 and storage.storage["trigger"] == 1
    assert rate_limit.SWEEP_SECONDS <= 5
