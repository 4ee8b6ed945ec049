"""Database errors never carry row data or parameters (hashes, tokens) into messages or logs."""

from __future__ import annotations

import traceback
import uuid
from datetime import UTC, datetime

import pytest

from usersvc.adapters.db import create_engine, create_read_engine
from usersvc.adapters.db_errors import SanitizedDatabaseError
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain.models import User, UserState


async def test_an_unexpected_database_error_is_sanitised(database_url: str) -> None:
    secret = f"$argon2id$v=19$m=19456,t=2,p=1$secret-{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    # name is NOT NULL: the insert fails, and PostgreSQL's DETAIL repeats the whole row.
    broken = User(
        id=uuid.uuid4(),
        email=f"{uuid.uuid4().hex}@example.com",
        name=None,  # type: ignore[arg-type]
        password_hash=secret,
        roles=(),
        state=UserState.ACTIVE,
        create_time=now,
        update_time=now,
        version=1,
    )
    engine = create_engine(database_url)
    read_engine = create_read_engine(database_url)

    async def insert() -> None:
        async with SqlUnitOfWorkFactory(engine, read_engine)() as uow:
            await uow.users.add(broken)
            await uow.commit()

    try:
        with pytest.raises(SanitizedDatabaseError) as caught:
            await insert()
        rendered = "".join(traceback.format_exception(caught.value))
        assert "sqlstate=" in str(caught.value)
        assert "name" in str(caught.value)
        assert "secret-" not in rendered
        assert secret[:30] not in rendered
    finally:
        await engine.dispose()
        if read_engine is not None:
            await read_engine.dispose()
