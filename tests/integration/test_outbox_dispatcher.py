"""OutboxDispatcher on real databases (SQLite and PostgreSQL) against a real SMTP server.

The dispatcher runs on a fake clock, so retries become due by moving the clock instead of
sleeping. The database is shared by the session: every test empties the outbox first (no
other test reads it) and checks only the rows it made.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.smtp_server import SmtpServer, free_port
from tests.support import make_settings, sync_engine
from usersvc.adapters.db import create_engine
from usersvc.adapters.tables import outbox
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.bootstrap import DISPATCHER_OFF_MESSAGE, build_dispatcher
from usersvc.domain.events import TOPIC_USER_CREATED, OutboxMessage
from usersvc.domain.models import User, UserState
from usersvc.metrics import Metrics
from usersvc.notifications.dispatcher import OutboxDispatcher
from usersvc.notifications.smtp import DeliveryFailed, SmtpSender
from usersvc.notifications.welcome_email import WELCOME_SUBJECT, build_welcome_email

SENDER = "Welcome Desk <welcome@example.com>"
TOPIC = {"topic": TOPIC_USER_CREATED}


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """A synchronous engine on the same database, to check what is really stored."""
    engine = sync_engine(database_url)
    with engine.begin() as conn:
        conn.execute(delete(outbox))
    yield engine
    engine.dispose()


@pytest.fixture
async def engine(database_url: str, db: Engine) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=5)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def sender_for(port: int, **overrides: Any) -> SmtpSender:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "starttls": False,
        "username": "",
        "password": SecretStr(""),
        "timeout_seconds": 5.0,
    }
    values.update(overrides)
    return SmtpSender(**values)


def dispatcher_for(
    engine: AsyncEngine, port: int, clock: FakeClock, metrics: Metrics, **overrides: Any
) -> OutboxDispatcher:
    values: dict[str, Any] = {
        "uow": SqlUnitOfWorkFactory(engine),
        "sender": sender_for(port),
        "metrics": metrics,
        "sender_address": SENDER,
        "clock": clock,
        "max_attempts": 3,
        "backoff_base_seconds": 10.0,
        "backoff_max_seconds": 100.0,
        "rng": random.Random(5),
    }
    values.update(overrides)
    return OutboxDispatcher(**values)


async def add_user(
    engine: AsyncEngine,
    clock: FakeClock,
    *,
    name: str = "Ada Lovelace",
    request_id: str | None = None,
) -> tuple[User, uuid.UUID]:
    """A user and its welcome record, written together as CreateUser does."""
    user = User(
        id=uuid.uuid4(),
        email=f"{uuid.uuid4().hex[:12]}@example.com",
        name=name,
        password_hash="$argon2id$not-a-real-hash",
        roles=(),
        state=UserState.ACTIVE,
        create_time=clock.now,
        update_time=clock.now,
        version=1,
    )
    welcome = OutboxMessage(
        topic=TOPIC_USER_CREATED,
        aggregate_id=user.id,
        payload={"user_id": str(user.id), "email": user.email, "name": user.name},
        request_id=request_id or f"req-{uuid.uuid4().hex[:8]}",
        create_time=clock.now,
    )
    async with SqlUnitOfWorkFactory(engine)() as tx:
        await tx.users.add(user)
        await tx.outbox.add(welcome)
        await tx.commit()
    return user, welcome.id


def row(db: Engine, outbox_id: uuid.UUID) -> RowMapping:
    with db.connect() as conn:
        return conn.execute(select(outbox).where(outbox.c.id == outbox_id)).mappings().one()


def count(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"usersvc_outbox_{name}_total", TOPIC) or 0.0


async def test_delivers_the_welcome_email_and_marks_the_record_delivered(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    metrics = Metrics()
    name = '<b>Ada</b> & "Bob"'
    user, outbox_id = await add_user(engine, clock, name=name)

    assert await dispatcher_for(engine, smtp.port, clock, metrics).run_once() == 1

    [mail] = smtp.handler.received
    assert mail.rcpt_tos == (user.email,)
    assert mail.message["To"] == user.email
    assert mail.message["From"] == SENDER
    assert mail.message["Subject"] == WELCOME_SUBJECT
    assert mail.message_id == f"<{outbox_id}@usersvc>"
    assert mail.message["Auto-Submitted"] == "auto-generated"
    assert name in mail.body("plain")
    html = mail.body("html")
    assert "&lt;b&gt;Ada&lt;/b&gt; &amp; &quot;Bob&quot;" in html
    assert "<b>Ada" not in html
    stored = row(db, outbox_id)
    assert (stored["status"], stored["attempts"], stored["claimed_until"]) == ("delivered", 1, None)
    assert count(metrics, "delivered") == 1
    # Settled: a second round finds nothing to send.
    assert await dispatcher_for(engine, smtp.port, clock, metrics).run_once() == 0
    assert len(smtp.handler.received) == 1


async def test_mail_server_down_retries_with_backoff_and_delivers_once_it_is_up(
    engine: AsyncEngine, db: Engine, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    port = free_port()  # nothing listens here yet
    dispatcher = dispatcher_for(engine, port, clock, metrics, max_attempts=5)
    _, outbox_id = await add_user(engine, clock, request_id="req-smtp-down")

    caplog.set_level(logging.INFO, logger="usersvc")
    assert await dispatcher.run_once() == 1
    first = row(db, outbox_id)
    assert (first["status"], first["attempts"], first["claimed_until"]) == ("pending", 1, None)
    assert first["last_error"]
    # Backoff base 10 s with equal jitter: due again in [5, 10] s, not before.
    assert clock.now + timedelta(seconds=5) <= first["next_attempt_time"]
    assert first["next_attempt_time"] <= clock.now + timedelta(seconds=10)
    assert await dispatcher.run_once() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [getattr(r, "request_id", None) for r in warnings] == ["req-smtp-down"]
    assert getattr(warnings[0], "outbox_id", None) == str(outbox_id)
    assert count(metrics, "retried") == 1

    clock.advance(10)
    assert await dispatcher.run_once() == 1
    second = row(db, outbox_id)
    assert (second["status"], second["attempts"]) == ("pending", 2)
    # The second wait is drawn from [10, 20] s: the delay grows with the attempts.
    assert second["next_attempt_time"] >= clock.now + timedelta(seconds=10)

    with SmtpServer(port) as smtp:
        clock.advance(20)
        assert await dispatcher.run_once() == 1
        [mail] = smtp.handler.received
    assert mail.message_id == f"<{outbox_id}@usersvc>"
    assert (row(db, outbox_id)["status"], row(db, outbox_id)["attempts"]) == ("delivered", 3)
    assert count(metrics, "delivered") == 1


async def test_a_4xx_reply_is_retried_and_the_email_delivered_once(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    metrics = Metrics()
    dispatcher = dispatcher_for(engine, smtp.port, clock, metrics)
    _, outbox_id = await add_user(engine, clock)
    smtp.handler.refuse_next(1, "451 4.3.0 Mailbox temporarily unavailable")

    await dispatcher.run_once()
    stored = row(db, outbox_id)
    assert (stored["status"], stored["attempts"]) == ("pending", 1)
    assert stored["last_error"].startswith("SMTP 451")
    assert smtp.handler.received == []

    clock.advance(100)
    await dispatcher.run_once()
    assert smtp.handler.refused == 1
    assert [m.message_id for m in smtp.handler.received] == [f"<{outbox_id}@usersvc>"]
    assert (row(db, outbox_id)["status"], row(db, outbox_id)["attempts"]) == ("delivered", 2)
    assert (count(metrics, "retried"), count(metrics, "delivered")) == (1, 1)


async def test_a_5xx_reply_is_retried_up_to_max_attempts_then_failed_and_counted(
    engine: AsyncEngine,
    db: Engine,
    smtp: SmtpServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    dispatcher = dispatcher_for(engine, smtp.port, clock, metrics, max_attempts=3)
    _, outbox_id = await add_user(engine, clock, request_id="req-rejected")
    smtp.handler.refuse_next(10, "550 5.1.1 No such mailbox")
    caplog.set_level(logging.INFO, logger="usersvc")

    for _ in range(3):
        assert await dispatcher.run_once() == 1
        clock.advance(100)
    assert await dispatcher.run_once() == 0

    stored = row(db, outbox_id)
    assert (stored["status"], stored["attempts"]) == ("failed", 3)
    assert stored["last_error"].startswith("SMTP 550")
    assert smtp.handler.refused == 3
    assert smtp.handler.received == []
    assert (count(metrics, "retried"), count(metrics, "failed")) == (2, 1)
    assert count(metrics, "delivered") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert {getattr(r, "request_id", None) for r in warnings} == {"req-rejected"}
    assert {getattr(r, "smtp_code", None) for r in warnings} == {550}


async def test_a_user_deleted_before_delivery_gets_no_email(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    metrics = Metrics()
    user, outbox_id = await add_user(engine, clock)
    kept, kept_id = await add_user(engine, clock)
    async with SqlUnitOfWorkFactory(engine)() as tx:
        assert await tx.users.delete(user.id)
        await tx.commit()

    assert await dispatcher_for(engine, smtp.port, clock, metrics).run_once() == 2

    assert [m.rcpt_tos for m in smtp.handler.received] == [(kept.email,)]
    assert row(db, outbox_id)["status"] == "skipped"
    assert row(db, kept_id)["status"] == "delivered"
    assert count(metrics, "delivered") == 1


async def test_service_accounts_under_dot_invalid_get_no_email(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    user, outbox_id = await add_user(engine, clock)
    async with SqlUnitOfWorkFactory(engine)() as tx:
        await tx.users.update(user.id, {"email": f"billing-{user.id.hex[:8]}@service.invalid"})
        await tx.commit()

    assert await dispatcher_for(engine, smtp.port, clock, Metrics()).run_once() == 1

    assert smtp.handler.received == []
    assert row(db, outbox_id)["status"] == "skipped"


async def test_the_email_goes_to_the_current_address_of_the_user(
    engine: AsyncEngine, smtp: SmtpServer, clock: FakeClock
) -> None:
    user, _ = await add_user(engine, clock)
    corrected = f"corrected-{user.email}"
    async with SqlUnitOfWorkFactory(engine)() as tx:
        await tx.users.update(user.id, {"email": corrected})
        await tx.commit()

    await dispatcher_for(engine, smtp.port, clock, Metrics()).run_once()

    assert [m.rcpt_tos for m in smtp.handler.received] == [(corrected,)]


async def test_records_leased_by_another_dispatcher_wait_until_the_lease_runs_out(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    _, outbox_id = await add_user(engine, clock)
    # Another dispatcher claimed the record and crashed before settling it.
    async with SqlUnitOfWorkFactory(engine)() as tx:
        [claimed] = await tx.outbox.claim_due(
            topics=[TOPIC_USER_CREATED],
            now=clock.now,
            lease_until=clock.now + timedelta(seconds=60),
            limit=10,
        )
        await tx.commit()
    dispatcher = dispatcher_for(engine, smtp.port, clock, Metrics())

    assert await dispatcher.run_once() == 0
    clock.advance(61)
    assert await dispatcher.run_once() == 1

    assert [m.message_id for m in smtp.handler.received] == [f"<{outbox_id}@usersvc>"]
    # The crashed dispatcher's late outcome cannot overwrite what the live one recorded.
    async with SqlUnitOfWorkFactory(engine)() as tx:
        assert not await tx.outbox.mark_failed(
            outbox_id, claimed_until=claimed.claimed_until, attempts=1, error="late", now=clock.now
        )
        await tx.commit()
    assert row(db, outbox_id)["status"] == "delivered"


async def test_records_not_yet_due_and_other_topics_are_left_alone(
    engine: AsyncEngine, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    later = OutboxMessage(
        topic=TOPIC_USER_CREATED,
        aggregate_id=uuid.uuid4(),
        payload={},
        request_id="r",
        create_time=clock.now + timedelta(seconds=30),
    )
    other = OutboxMessage(
        topic="user.renamed",
        aggregate_id=uuid.uuid4(),
        payload={},
        request_id="r",
        create_time=clock.now,
    )
    async with SqlUnitOfWorkFactory(engine)() as tx:
        await tx.outbox.add(later)
        await tx.outbox.add(other)
        await tx.commit()

    assert await dispatcher_for(engine, smtp.port, clock, Metrics()).run_once() == 0
    assert row(db, other.id)["status"] == "pending"
    assert row(db, later.id)["claimed_until"] is None


async def test_two_dispatchers_never_send_one_record_twice(
    database_url: str, db: Engine, smtp: SmtpServer, clock: FakeClock
) -> None:
    engines = [create_engine(database_url, pool_size=5) for _ in range(2)]
    try:
        ids = {(await add_user(engines[0], clock))[1] for _ in range(30)}
        metrics = [Metrics(), Metrics()]
        dispatchers = [
            dispatcher_for(e, smtp.port, clock, m, batch_size=3, send_concurrency=2)
            for e, m in zip(engines, metrics, strict=True)
        ]

        async def drain(dispatcher: OutboxDispatcher) -> None:
            while await dispatcher.run_once():
                pass

        await asyncio.wait_for(asyncio.gather(*(drain(d) for d in dispatchers)), timeout=60)
    finally:
        for e in engines:
            await e.dispose()

    message_ids = [m.message_id for m in smtp.handler.received]
    assert sorted(message_ids) == sorted(f"<{i}@usersvc>" for i in ids)
    with db.connect() as conn:
        statuses = conn.execute(select(outbox.c.status, outbox.c.attempts)).all()
    assert set(statuses) == {("delivered", 1)}
    # Both really took part, so the claims were contended.
    assert all(count(m, "delivered") > 0 for m in metrics)


async def test_run_forever_delivers_until_stopped(
    engine: AsyncEngine, smtp: SmtpServer, clock: FakeClock
) -> None:
    dispatcher = dispatcher_for(engine, smtp.port, clock, Metrics(), poll_seconds=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run_forever(stop))
    try:
        _, outbox_id = await add_user(engine, clock)
        received = await asyncio.to_thread(smtp.handler.wait_for, 1)
        assert [m.message_id for m in received] == [f"<{outbox_id}@usersvc>"]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_run_forever_survives_an_unreachable_database(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    unreachable = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing", pool_size=1
    )
    dispatcher = dispatcher_for(unreachable, free_port(), clock, Metrics(), poll_seconds=0.02)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="usersvc")
    task = asyncio.create_task(dispatcher.run_forever(stop))
    try:
        for _ in range(500):
            if skipped_rounds(caplog) >= 2:
                break
            await asyncio.sleep(0.01)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        await unreachable.dispose()
    assert skipped_rounds(caplog) >= 2


def skipped_rounds(caplog: pytest.LogCaptureFixture) -> int:
    return sum("skipped a round" in r.getMessage() for r in caplog.records)


async def test_sender_logs_in_with_the_configured_credentials() -> None:
    with SmtpServer(credentials=("mailer", "s3cret")) as smtp:
        message = build_welcome_email(
            outbox_id=uuid.uuid4(),
            sender=SENDER,
            recipient="someone@example.com",
            name="Someone",
            date=datetime.now(UTC),
        )
        await sender_for(smtp.port, username="mailer", password=SecretStr("s3cret")).send(message)
        with pytest.raises(DeliveryFailed) as refused:
            await sender_for(smtp.port, username="mailer", password=SecretStr("wrong")).send(
                message
            )
        assert [m.login for m in smtp.handler.received] == ["mailer"]
    assert refused.value.smtp_code == 535


async def test_sender_with_starttls_refuses_a_server_that_does_not_offer_it(
    smtp: SmtpServer,
) -> None:
    message = build_welcome_email(
        outbox_id=uuid.uuid4(),
        sender=SENDER,
        recipient="someone@example.com",
        name="Someone",
        date=datetime.now(UTC),
    )
    with pytest.raises(DeliveryFailed, match="STARTTLS"):
        await sender_for(smtp.port, starttls=True).send(message)
    assert smtp.handler.received == []


def test_without_smtp_host_there_is_no_dispatcher_and_the_log_says_so_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    settings = make_settings("sqlite+aiosqlite:///unused.sqlite3", str(tmp_path))
    caplog.set_level(logging.INFO, logger="usersvc")
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/unused.sqlite3")
    try:
        assert build_dispatcher(settings, engine, Metrics()) is None
        configured = make_settings(
            "sqlite+aiosqlite:///unused.sqlite3", str(tmp_path), smtp_host="127.0.0.1"
        )
        assert isinstance(build_dispatcher(configured, engine, Metrics()), OutboxDispatcher)
    finally:
        asyncio.run(engine.dispose())
    assert [r.getMessage() for r in caplog.records] == [DISPATCHER_OFF_MESSAGE]
