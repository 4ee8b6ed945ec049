"""Helpers of the data-integrity end-to-end tests (audit trail, etags, idempotency, races)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format
from sqlalchemy import select
from sqlalchemy.engine import Engine, RowMapping

from tests.e2e.conftest import ADMIN_EMAIL
from tests.secrets_registry import record_secrets, remember
from tests.support import with_bearer
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import audit_events, refresh_tokens
from usersvc.adapters.tables import users as users_table
from usersvc.bootstrap import Components, build_components
from usersvc.config import Settings

Metadata = tuple[tuple[str, str], ...]


def unique_email(prefix: str = "integrity") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def new_password() -> str:
    """A password no other test uses, remembered for the final audit scan."""
    password = f"integrity pass {uuid.uuid4().hex[:16]}"
    remember(password)
    return password


def request_id_metadata(request_id: str | None = None) -> Metadata:
    return (("x-request-id", request_id or f"it-{uuid.uuid4()}"),)


def create_user(
    users: UserServiceStub,
    *,
    email: str | None = None,
    name: str = "Integrity Test",
    password: str | None = None,
    request_id: str = "",
    metadata: Metadata = (),
) -> tuple[user_pb2.User, str]:
    """A user created through the API, and its password."""
    password = password or new_password()
    request = pb.CreateUserRequest(
        email=email or unique_email(), name=name, password=password, request_id=request_id
    )
    user: user_pb2.User = users.CreateUser(request, metadata=metadata).user
    return user, password


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def update(
    users: UserServiceStub, user: user_pb2.User, *paths: str, metadata: Metadata = ()
) -> user_pb2.User:
    response = users.UpdateUser(
        pb.UpdateUserRequest(user=user, update_mask=mask(*paths)), metadata=metadata
    )
    result: user_pb2.User = response.user
    return result


def login(channel: grpc.Channel, email: str, password: str) -> auth_pb.TokenPair:
    """Log in through the API; the tokens are remembered for the final audit scan."""
    stub = AuthServiceStub(record_secrets(channel))
    tokens: auth_pb.TokenPair = stub.Login(
        auth_pb.LoginRequest(email=email, password=password)
    ).tokens
    remember(tokens.access_token, tokens.refresh_token)
    return tokens


def stub_as(channel: grpc.Channel, email: str, password: str) -> UserServiceStub:
    """UserService as the user `email` (after logging in)."""
    token = login(channel, email, password).access_token
    return UserServiceStub(with_bearer(channel, token))


def code_of(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call), error
    code: grpc.StatusCode = error.code()
    return code


@dataclass
class Outcome:
    code: grpc.StatusCode
    response: Any
    error: grpc.RpcError | None


def fire(calls: Sequence[Callable[[], grpc.Future[Any]]]) -> list[Outcome]:
    """Start every call before waiting for any, then collect each one's outcome in order."""
    futures = [start() for start in calls]
    outcomes: list[Outcome] = []
    for future in futures:
        error = future.exception(timeout=120)
        if error is None:
            outcomes.append(Outcome(grpc.StatusCode.OK, future.result(), None))
        else:
            assert isinstance(error, grpc.RpcError), error
            outcomes.append(Outcome(code_of(error), None, error))
    return outcomes


def codes(outcomes: Sequence[Outcome]) -> dict[grpc.StatusCode, int]:
    counted: dict[grpc.StatusCode, int] = {}
    for outcome in outcomes:
        counted[outcome.code] = counted.get(outcome.code, 0) + 1
    return counted


# --- the database, read directly -------------------------------------------------------------


def admin_id(db: Engine) -> str:
    with db.connect() as conn:
        found = conn.execute(
            select(users_table.c.id).where(users_table.c.email == ADMIN_EMAIL)
        ).scalar_one()
    return str(found)


def stored_user(db: Engine, user_id: str) -> RowMapping | None:
    with db.connect() as conn:
        return (
            conn.execute(select(users_table).where(users_table.c.id == uuid.UUID(user_id)))
            .mappings()
            .first()
        )


def users_with_email(db: Engine, email: str) -> list[RowMapping]:
    with db.connect() as conn:
        return list(
            conn.execute(select(users_table).where(users_table.c.email == email)).mappings()
        )


def audit_rows(db: Engine, user_id: str | None = None) -> list[RowMapping]:
    """Audit rows, oldest first (ties by id), of one user or all."""
    stmt = select(audit_events).order_by(audit_events.c.create_time, audit_events.c.id)
    if user_id is not None:
        stmt = stmt.where(audit_events.c.user_id == uuid.UUID(user_id))
    with db.connect() as conn:
        return list(conn.execute(stmt).mappings())


def refresh_token_rows(db: Engine, user_id: str) -> list[RowMapping]:
    with db.connect() as conn:
        return list(
            conn.execute(
                select(refresh_tokens)
                .where(refresh_tokens.c.user_id == uuid.UUID(user_id))
                .order_by(refresh_tokens.c.id)
            ).mappings()
        )


def row_text(row: RowMapping) -> str:
    """Every column of a row as one JSON text, for substring checks."""
    return json.dumps(dict(row), default=str, ensure_ascii=False, sort_keys=True)


# --- audit events through the API ------------------------------------------------------------


def all_events(users: UserServiceStub, user_id: str, page_size: int = 100) -> list[Any]:
    """Every event of a user through ListAuditEvents, following the page tokens."""
    events: list[Any] = []
    token = ""
    for _ in range(1000):
        response = users.ListAuditEvents(
            pb.ListAuditEventsRequest(user_id=user_id, page_size=page_size, page_token=token)
        )
        events.extend(response.events)
        token = response.next_page_token
        if not token:
            return events
    raise AssertionError("paging does not end")


def changes_of(event: user_pb2.AuditEvent) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} with the values as plain JSON values."""
    return {
        c.field: (json_format.MessageToDict(c.old_value), json_format.MessageToDict(c.new_value))
        for c in event.changes
    }


# --- components beside the server -------------------------------------------------------------


def with_components(settings: Settings, job: Callable[[Components], Any]) -> Any:
    """Run `job(components)` (a coroutine function) on components of the server's settings."""

    async def run() -> Any:
        components = build_components(settings)
        try:
            return await job(components)
        finally:
            await components.close()

    return asyncio.run(run())
