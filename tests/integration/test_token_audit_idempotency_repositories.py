"""The refresh-token, audit and idempotency repositories on real databases: what is stored.

Their behaviour is shared with the fakes in tests/contract; these tests look at the rows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tests.support import sync_engine
from usersvc.adapters.db import create_engine
from usersvc.adapters.tables import audit_events, idempotency_keys, refresh_tokens
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain.audit import AuditEvent
from usersvc.domain.models import User, UserState

# In the past, so that no row here is ever the newest another test on the database lists.
NOW = datetime(1992, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)


@pytest.fixture
async def uow(database_url: str) -> AsyncIterator[SqlUnitOfWorkFactory]:
    engine = create_engine(database_url, pool_size=2)
    try:
        yield SqlUnitOfWorkFactory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = sync_engine(database_url)
    yield engine
    engine.dispose()


async def _user(uow: SqlUnitOfWorkFactory) -> User:
    user = User(
        id=uuid.uuid4(),
        email=f"{uuid.uuid4().hex}@example.com",
        name="Repo Test",
        password_hash="$argon2id$repo-test",
        roles=(),
        state=UserState.ACTIVE,
        create_time=NOW,
        update_time=NOW,
        version=1,
    )
    async with uow() as tx:
        await tx.users.add(user)
        await tx.commit()
    return user


async def test_a_refresh_token_row_holds_the_hash_the_status_and_utc_times(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    user = await _user(uow)
    token_hash, family = uuid.uuid4().hex * 2, uuid.uuid4()
    async with uow() as tx:
        await tx.refresh_tokens.add(
            token_hash=token_hash,
            user_id=user.id,
            family_id=family,
            now=NOW,
            expire_time=NOW + timedelta(days=30),
        )
        record = await tx.refresh_tokens.get_by_hash(token_hash)
        assert record is not None
        await tx.refresh_tokens.mark_used(record.id)
        await tx.commit()
    with db.connect() as conn:
        row = conn.execute(
            select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash)
        ).one()
    assert (row.user_id, row.family_id, row.status) == (user.id, family, "used")
    assert row.create_time == NOW
    assert row.expire_time == NOW + timedelta(days=30)
    assert row.create_time.utcoffset() == timedelta(0)


async def test_an_audit_event_round_trips_nested_json_and_keeps_its_id(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    event = AuditEvent(
        user_id=uuid.uuid4(),
        action="user.roles_changed",
        changes={
            "roles": {"old": [], "new": ["admin", "service"]},
            "name": {"old": "Zoë", "new": None},
        },
        actor="system",
        request_id="req-ünïcode",
        create_time=NOW,
    )
    async with uow() as tx:
        await tx.audit.add(event)
        await tx.commit()
    async with uow(write=False) as tx:
        listed = await tx.audit.list(limit=5, after=None, user_id=event.user_id)
    assert listed == [event]
    with db.connect() as conn:
        row = conn.execute(select(audit_events).where(audit_events.c.id == event.id)).one()
    assert row.changes == event.changes


async def test_an_idempotency_row_is_keyed_by_caller_and_request_id(
    uow: SqlUnitOfWorkFactory, db: Engine
) -> None:
    caller, request_id = f"c-{uuid.uuid4().hex[:12]}", str(uuid.uuid4())
    result = {"id": str(uuid.uuid4()), "name": "Zoë", "roles": ["admin"], "version": 3}
    async with uow() as tx:
        await tx.idempotency.add(
            caller=caller, request_id=request_id, fingerprint="a" * 64, result=result, now=NOW
        )
        await tx.commit()
    with db.connect() as conn:
        rows = conn.execute(
            select(idempotency_keys).where(idempotency_keys.c.caller == caller)
        ).all()
    assert [(r.request_id, r.fingerprint, r.result, r.create_time) for r in rows] == [
        (request_id, "a" * 64, result, NOW)
    ]
    async with uow() as tx:  # leave nothing for the purge tests to count
        await tx.idempotency.delete_expired(
            caller=caller, request_id=request_id, cutoff=NOW + timedelta(1)
        )
        await tx.commit()
