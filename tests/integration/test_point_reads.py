"""The per-call point reads when the database cannot be reached."""

from __future__ import annotations

import socket
import uuid

import pytest

from usersvc.adapters.point_reads import PostgresPointReads
from usersvc.domain.errors import StorageUnavailable


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_postgresql_is_storage_unavailable() -> None:
    reads = PostgresPointReads(
        f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/usersvc", size=1
    )
    try:
        with pytest.raises(StorageUnavailable):
            await reads.get(uuid.uuid4())
        with pytest.raises(StorageUnavailable):
            await reads.auth_state(uuid.uuid4())
    finally:
        await reads.close()
