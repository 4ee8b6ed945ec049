"""Waking change-feed readers: in this process at commit, across processes by LISTEN/NOTIFY.

Only a hint: readers read the events table after every wake-up and also every poll interval,
so a lost notification (a dropped listener connection, a restarted database) costs at most
one interval, never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from sqlalchemy.engine import make_url

from usersvc.adapters.user_event_repository import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0


class LocalChangeSignal:
    """Wakes every reader of this process (one event loop)."""

    def __init__(self) -> None:
        self._generation = 0
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        self._generation += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def ticket(self) -> int:
        return self._generation

    async def wait(self, ticket: int, seconds: float) -> None:
        if ticket != self._generation:
            return
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()


class PostgresChangeListener:
    """One connection per process LISTENing on the feed's channel; each notification (and
    each reconnection, after which anything may have been missed) wakes the local readers."""

    def __init__(self, database_url: str, signal: LocalChangeSignal) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._signal = signal
        self._task: asyncio.Task[None] | None = None
        # Set while LISTEN is in effect (tests wait for it).
        self.listening = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="user-events-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.listening.set()
                    if failing:
                        log.info("listening for user events again")
                        failing = False
                    self._signal.notify()
                    async for _ in conn.notifies():
                        self._signal.notify()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self.listening.clear()
                if not failing:
                    log.warning(
                        "user event listener lost its connection; polling until it is back: %s",
                        type(err).__name__,
                    )
                    failing = True
                self._signal.notify()
            await asyncio.sleep(RECONNECT_SECONDS)
