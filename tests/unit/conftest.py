"""Factory fixtures for the service-layer unit tests: fakes of every port, wired once."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

import pytest

from tests.unit.fakes import FakeClock, FakePasswordHasher, FakeUnitOfWorkFactory
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.services.ports import PasswordHasher
from usersvc.services.users import UserService

START = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


class UserServiceFactory(Protocol):
    def __call__(self, **overrides: Any) -> UserService: ...


@pytest.fixture
def uow() -> FakeUnitOfWorkFactory:
    return FakeUnitOfWorkFactory()


@pytest.fixture
def hasher() -> PasswordHasher:
    return FakePasswordHasher()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(b"unit-test-secret")


@pytest.fixture
def make_user_service(
    uow: FakeUnitOfWorkFactory, hasher: PasswordHasher, clock: FakeClock, codec: PageTokenCodec
) -> UserServiceFactory:
    """A UserService on the test's fakes; keyword arguments replace any constructor argument."""

    def make(**overrides: Any) -> UserService:
        arguments: dict[str, Any] = {
            "uow": uow,
            "hasher": hasher,
            "page_tokens": codec,
            "clock": clock,
            **overrides,
        }
        return UserService(**arguments)

    return make


@pytest.fixture
def service(make_user_service: UserServiceFactory) -> UserService:
    return make_user_service()
