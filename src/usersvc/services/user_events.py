"""WatchUserEvents: the change feed of users, resumable from any position it handed out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from usersvc.domain.errors import (
    ConsumerTooSlow,
    FieldViolation,
    InvalidResumeToken,
    ResumeTokenExpired,
    StreamShutDown,
    ValidationFailed,
)
from usersvc.domain.user_events import UserEventRecord
from usersvc.services.clock import utc_now
from usersvc.services.ports import ChangeSignal, Clock, ResumeTokenCodec, UserEventSource

log = logging.getLogger(__name__)

# A token is refused as expired this long before the events after it may have been purged:
# an event's time is taken when its transaction starts, so the events after a position may
# be a little older than the position's own time.
EXPIRY_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One message of a watch: an event, or a checkpoint (event None); both with the token
    that resumes after them."""

    event: UserEventRecord | None
    resume_token: str


class UserEventFeed:
    """Streams committed user events after a resume position, then new ones as they commit.

    Each stream reads the events table at its own pace (one batch at a time): a slow reader
    holds no memory beyond its batch and never slows writers or other readers.
    """

    def __init__(
        self,
        *,
        source: UserEventSource,
        signal: ChangeSignal,
        tokens: ResumeTokenCodec,
        clock: Clock = utc_now,
        retention_seconds: float = 7 * 24 * 3600,
        poll_seconds: float = 1.0,
        checkpoint_seconds: float = 30.0,
        slow_consumer_seconds: float = 30.0,
        batch_size: int = 100,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._signal = signal
        self._tokens = tokens
        self._clock = clock
        self._retention = timedelta(seconds=retention_seconds)
        self._poll = poll_seconds
        self._checkpoint = checkpoint_seconds
        self._slow = slow_consumer_seconds
        self._batch = batch_size
        self._monotonic = monotonic
        # Set when the server shuts down: every open stream ends with its resume token.
        self.stopping = asyncio.Event()

    def shut_down(self) -> None:
        self.stopping.set()

    async def purge(self) -> int:
        """Delete events older than the retention period; how many."""
        return await self._source.purge_older_than(self._clock() - self._retention)

    def _start(self, after: str) -> tuple[int, datetime] | None:
        """The position `after` names; None for "from now"."""
        if not after:
            return None
        try:
            position, issued = self._tokens.decode(after)
        except InvalidResumeToken:
            raise ValidationFailed(
                [FieldViolation("after", "resume token is invalid", "INVALID_RESUME_TOKEN")]
            ) from None
        if issued < self._clock() - self._retention + EXPIRY_MARGIN:
            raise ResumeTokenExpired()
        return position, issued

    async def watch(self, after: str) -> AsyncGenerator[FeedItem, None]:
        """Every event after `after` (empty: from now), then new ones, until cancelled.

        Starts with a checkpoint. ValidationFailed for a bad token, ResumeTokenExpired for a
        purged position; ends with StreamShutDown when the server stops. How fast the items
        are taken is `deliver`'s concern.
        """
        start = self._start(after)
        if start is None:
            position, issued = await self._source.head(), self._clock()
        else:
            position, issued = start
        cursor = self._source.cursor(position)
        token = self._tokens.encode(position, issued)
        last_sent = self._monotonic()
        yield FeedItem(None, token)
        while True:
            if self.stopping.is_set():
                raise StreamShutDown(resume_token=token)
            ticket = self._signal.ticket()
            batch = await cursor.next_batch(self._batch)
            for record in batch:
                token = self._tokens.encode(record.position, record.change.create_time)
                yield FeedItem(record, token)
                last_sent = self._monotonic()
            if len(batch) == self._batch:
                continue
            if self._monotonic() - last_sent >= self._checkpoint:
                token = self._tokens.encode(cursor.position, self._clock())
                yield FeedItem(None, token)
                last_sent = self._monotonic()
            if self.stopping.is_set():
                raise StreamShutDown(resume_token=token)
            await self._wait(ticket)

    async def deliver(self, after: str, send: Callable[[FeedItem], Awaitable[None]]) -> None:
        """Send every item of `watch(after)` through `send`, until cancelled or it ends.

        A send that has not completed within the slow-consumer limit (the consumer stopped
        reading, so the transport stopped taking messages) is abandoned and the stream ends
        with ConsumerTooSlow carrying the token of the last item whose send completed. Every
        completed send is ahead of the error on the stream, so a consumer resuming from that
        token misses nothing and sees again at most the one event that was in flight.
        """
        items = self.watch(after)
        delivered = ""
        try:
            async for item in items:
                if item.event is None:
                    # No event lies between the previous position and a checkpoint's.
                    delivered = item.resume_token
                try:
                    async with asyncio.timeout(self._slow):
                        await send(item)
                except TimeoutError:
                    log.warning(
                        "watch stream ended: the consumer took no message for %s s", self._slow
                    )
                    raise ConsumerTooSlow(resume_token=delivered) from None
                delivered = item.resume_token
        finally:
            await items.aclose()

    async def _wait(self, ticket: int) -> None:
        """Until a commit may have happened, the server stops, or the poll interval ends."""
        stop = asyncio.ensure_future(self.stopping.wait())
        woken = asyncio.ensure_future(self._signal.wait(ticket, self._poll))
        try:
            await asyncio.wait((stop, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            woken.cancel()
