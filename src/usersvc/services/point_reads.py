"""Point reads through a read-only unit of work: the portable way, and the fallback."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence

from usersvc.domain.models import PageCursor, User, UserState, UserView
from usersvc.domain.user_filter import UserFilter
from usersvc.services.ports import UnitOfWorkFactory


class UnitOfWorkPointReads:
    """UserPointReads over any unit of work (the fakes, in-memory SQLite)."""

    def __init__(self, uow: UnitOfWorkFactory) -> None:
        self._uow = uow

    async def get(self, user_id: uuid.UUID) -> User | None:
        async with self._uow(write=False) as uow:
            return await uow.users.get(user_id)

    async def get_by_email(self, email: str) -> User | None:
        async with self._uow(write=False) as uow:
            return await uow.users.get_by_email(email)

    async def auth_state(self, user_id: uuid.UUID) -> tuple[int, UserState] | None:
        async with self._uow(write=False) as uow:
            return await uow.users.auth_state(user_id)

    async def list_page(self, *, limit: int, after: PageCursor | None) -> Sequence[User]:
        async with self._uow(write=False) as uow:
            return await uow.users.list(limit=limit, after=after, where=UserFilter())

    async def get_many(self, user_ids: Collection[uuid.UUID]) -> Sequence[UserView]:
        async with self._uow(write=False) as uow:
            return [user.view() for user in await uow.users.get_many(user_ids)]
