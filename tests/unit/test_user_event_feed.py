"""UserEventFeed (the WatchUserEvents use case) over an in-memory feed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from tests.unit.fakes import FakeUnitOfWorkFactory
from usersvc.adapters.resume_tokens import ResumeTokenCodec
from usersvc.domain import user_events
from usersvc.domain.auth import ADMIN, Principal, RequestContext
from usersvc.domain.errors import (
    ConsumerTooSlow,
    EtagMismatch,
    ResumeTokenExpired,
    StreamShutDown,
    ValidationFailed,
)
from usersvc.domain.models import UserState, UserView
from usersvc.domain.user_events import UserChange, UserEventRecord
from usersvc.services.user_events import FeedItem, UserEventFeed
from usersvc.services.users import UserService

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CALLER = Principal(user_id=uuid.uuid4(), roles=frozenset({ADMIN}))


def change(name: str) -> UserChange:
    user = UserView(uuid.uuid4(), f"{name}@example.com", name, (), UserState.ACTIVE, NOW, NOW, 1)
    return UserChange(user_events.UPDATED, user, ("name",), name, NOW)


class MemoryFeed:
    """The feed as a list; positions are 1-based indexes."""

    def __init__(self) -> None:
        self.events: list[UserChange] = []

    async def head(self) -> int:
        return len(self.events)

    def cursor(self, position: int) -> MemoryCursor:
        return MemoryCursor(self, position)

    async def purge_older_than(self, cutoff: datetime) -> int:
        return 0


class MemoryCursor:
    def __init__(self, feed: MemoryFeed, position: int) -> None:
        self.feed = feed
        self.position = position

    async def next_batch(self, limit: int) -> Sequence[UserEventRecord]:
        taken = self.feed.events[self.position : self.position + limit]
        batch = [UserEventRecord(self.position + n + 1, c) for n, c in enumerate(taken)]
        if batch:
            self.position = batch[-1].position
        return batch


class ManualSignal:
    def __init__(self) -> None:
        self.generation = 0
        self.woken = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self.woken.set()

    def ticket(self) -> int:
        return self.generation

    async def wait(self, ticket: int, seconds: float) -> None:
        if ticket == self.generation:
            await self.woken.wait()
        self.woken.clear()


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


TOKENS = ResumeTokenCodec(b"secret")


def feed_of(memory: MemoryFeed, signal: ManualSignal, ticks: Ticks | None = None) -> UserEventFeed:
    return UserEventFeed(
        source=memory,
        signal=signal,
        tokens=TOKENS,
        clock=lambda: NOW,
        checkpoint_seconds=30,
        slow_consumer_seconds=10,
        batch_size=2,
        monotonic=ticks or Ticks(),
    )


async def test_from_now_starts_with_a_checkpoint_then_sends_new_events_as_woken() -> None:
    memory, signal = MemoryFeed(), ManualSignal()
    memory.events.append(change("before"))
    stream = feed_of(memory, signal).watch("")
    first = await anext(stream)
    assert first.event is None
    assert TOKENS.decode(first.resume_token)[0] == 1
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    memory.events.extend([change("a"), change("b"), change("c")])
    signal.notify()
    items = [await pending, await anext(stream), await anext(stream)]
    assert [i.event.change.request_id for i in items if i.event] == ["a", "b", "c"]
    assert [TOKENS.decode(i.resume_token)[0] for i in items] == [2, 3, 4]
    await stream.aclose()


async def test_a_resume_token_continues_right_after_its_event() -> None:
    memory, signal = MemoryFeed(), ManualSignal()
    memory.events.extend(change(n) for n in "abcde")
    stream = feed_of(memory, signal).watch(TOKENS.encode(2, NOW))
    items = [await anext(stream) for _ in range(4)]
    assert items[0].event is None
    assert [i.event.change.request_id for i in items[1:] if i.event] == ["c", "d", "e"]
    await stream.aclose()


@pytest.mark.parametrize("token", ["garbage", TOKENS.encode(1, NOW)[:-1] + "A", "é"])
async def test_a_bad_token_is_a_validation_error_of_after(token: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await anext(feed_of(MemoryFeed(), ManualSignal()).watch(token))
    assert [v.field for v in caught.value.violations] == ["after"]


async def test_a_token_past_the_retention_is_expired() -> None:
    old = TOKENS.encode(1, NOW - timedelta(days=7))
    with pytest.raises(ResumeTokenExpired):
        await anext(feed_of(MemoryFeed(), ManualSignal()).watch(old))
    recent = TOKENS.encode(1, NOW - timedelta(days=6))
    assert (await anext(feed_of(MemoryFeed(), ManualSignal()).watch(recent))).event is None


async def test_a_send_not_taken_in_time_ends_the_stream_with_the_last_token_sent() -> None:
    memory, signal = MemoryFeed(), ManualSignal()
    memory.events.extend(change(n) for n in "abc")
    feed = UserEventFeed(
        source=memory, signal=signal, tokens=TOKENS, clock=lambda: NOW, slow_consumer_seconds=0.05
    )
    sent: list[FeedItem] = []
    stalled = asyncio.Event()

    async def send(item: FeedItem) -> None:
        if len(sent) == 2:  # the consumer stops reading: the transport takes nothing more
            stalled.set()
            await asyncio.Event().wait()
        sent.append(item)

    with pytest.raises(ConsumerTooSlow) as caught:
        await feed.deliver(TOKENS.encode(0, NOW), send)
    assert stalled.is_set()
    assert [i.event is None for i in sent] == [True, False]
    # The event in flight ("b") is after the token: resuming repeats it, loses nothing.
    assert caught.value.resume_token == sent[-1].resume_token
    assert TOKENS.decode(caught.value.resume_token)[0] == 1


async def test_a_first_checkpoint_not_taken_names_the_starting_position() -> None:
    memory, signal = MemoryFeed(), ManualSignal()
    feed = UserEventFeed(
        source=memory, signal=signal, tokens=TOKENS, clock=lambda: NOW, slow_consumer_seconds=0.05
    )

    async def never(item: FeedItem) -> None:
        await asyncio.Event().wait()

    start = TOKENS.encode(0, NOW)
    with pytest.raises(ConsumerTooSlow) as caught:
        await feed.deliver(start, never)
    assert TOKENS.decode(caught.value.resume_token)[0] == 0


async def test_shutting_down_ends_the_stream_with_the_last_token() -> None:
    memory, signal = MemoryFeed(), ManualSignal()
    memory.events.append(change("a"))
    feed = feed_of(memory, signal)
    stream = feed.watch(TOKENS.encode(0, NOW))
    await anext(stream)
    last = await anext(stream)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    feed.shut_down()
    with pytest.raises(StreamShutDown) as caught:
        await waiting
    assert caught.value.resume_token == last.resume_token


async def test_each_committed_change_writes_one_event_and_a_refused_one_none(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    ctx = RequestContext(CALLER, request_id="req-1")
    user = await service.create_user(
        ctx=ctx, email="feed@example.com", name="Feed", password="correct horse battery staple"
    )
    await service.update_user(
        ctx=ctx, user_id=str(user.id), paths=["name"], email="", name="Renamed", etag=""
    )
    # The same name again changes nothing: no version, no event.
    await service.update_user(
        ctx=ctx, user_id=str(user.id), paths=["name"], email="", name="Renamed", etag=""
    )
    with pytest.raises(EtagMismatch):
        await service.disable_user(ctx=ctx, user_id=str(user.id), etag='"1"')
    await service.disable_user(ctx=ctx, user_id=str(user.id), etag="")
    await service.delete_user(ctx=ctx, user_id=str(user.id))
    assert [(e.type, e.changed_fields, e.user.version) for e in uow.user_events] == [
        (user_events.CREATED, ("email", "name", "password", "roles", "state"), 1),
        (user_events.UPDATED, ("name",), 2),
        (user_events.DISABLED, ("state",), 3),
        # Soft delete: the user as it is now, state DELETED, a version of its own.
        (user_events.DELETED, ("state",), 4),
    ]
    assert uow.user_events[-1].user.state is UserState.DELETED
    assert {e.request_id for e in uow.user_events} == {"req-1"}
    assert uow.user_events[1].user.name == "Renamed"
    assert len(uow.audit) == len(uow.user_events)


async def test_an_unlock_is_an_unlocked_event_naming_the_counters(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    ctx = RequestContext(CALLER, request_id="req-2")
    user = await service.create_user(
        ctx=ctx, email="locked@example.com", name="Locked", password="correct horse battery staple"
    )
    async with uow() as tx:
        await tx.users.record_login_failure(
            user.id, now=NOW, max_failures=1, lock_until=NOW + timedelta(hours=1)
        )
        await tx.commit()
    await service.unlock_user(ctx=ctx, user_id=str(user.id), etag="")
    last = uow.user_events[-1]
    assert (last.type, last.changed_fields) == (
        user_events.UNLOCKED,
        ("failed_login_count", "locked_until"),
    )
