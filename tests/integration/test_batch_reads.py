"""BatchGetUsers costs the database one statement, whatever the number of ids."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event

from tests.unit.fakes import FakePasswordHasher
from usersvc.adapters.db import create_engine
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.models import User, UserState
from usersvc.services.users import UserService

SERVICE = RequestContext(Principal(user_id=uuid.uuid4(), roles=frozenset({"service"})))


@pytest.fixture
async def statements(
    database_url: str,
) -> AsyncIterator[tuple[UserService, SqlUnitOfWorkFactory, list[str]]]:
    """A UserService on the database, its units of work, and every statement they send."""
    engine = create_engine(database_url, pool_size=2)
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    uow = SqlUnitOfWorkFactory(engine)
    service = UserService(
        uow=uow,
        hasher=FakePasswordHasher(),
        page_tokens=PageTokenCodec(b"integration-test-secret"),
    )
    try:
        yield service, uow, sent
    finally:
        await engine.dispose()


async def test_a_batch_of_1000_ids_is_one_statement(
    statements: tuple[UserService, SqlUnitOfWorkFactory, list[str]],
) -> None:
    service, uow, sent = statements
    now = datetime.now(UTC)
    made = [
        User(
            id=uuid.uuid4(),
            email=f"{uuid.uuid4().hex}@example.com",
            name="Batch",
            password_hash="$argon2id$batch",
            roles=(),
            state=UserState.ACTIVE,
            create_time=now,
            update_time=now,
            version=1,
        )
        for _ in range(3)
    ]
    async with uow() as tx:
        for user in made:
            await tx.users.add(user)
        await tx.commit()
    ids = [str(made[n % 3].id) for n in range(997)] + [str(uuid.uuid4()) for _ in range(3)]
    sent.clear()
    result = await service.batch_get_users(ctx=SERVICE, user_ids=ids, allow_missing=True)
    assert [u.id for u in result.users] == [made[n % 3].id for n in range(997)]
    assert len(result.missing_ids) == 3
    reads = [s for s in sent if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 1, sent
    assert "users" in reads[0]
