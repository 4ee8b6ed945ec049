"""Reading the audit trail."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from usersvc.domain.audit import AuditEvent
from usersvc.domain.errors import FieldViolation, ValidationFailed
from usersvc.domain.validation import parse_user_id
from usersvc.services.paging import cut_page, parse_page_request
from usersvc.services.ports import PageCursorCodec, UnitOfWorkFactory


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: Sequence[AuditEvent]
    next_page_token: str


class AuditService:
    """Lists audit events, newest first, with the same keyset page tokens as ListUsers."""

    def __init__(self, *, uow: UnitOfWorkFactory, page_tokens: PageCursorCodec) -> None:
        self._uow = uow
        self._page_tokens = page_tokens

    async def list_events(self, *, page_size: int, page_token: str, user_id: str) -> AuditPage:
        """One page of events, newest first, optionally of one user."""
        violations: list[FieldViolation] = []
        uid = None
        if user_id:
            uid, violation = parse_user_id(user_id, "user_id")
            violations.extend([violation] if violation else [])
        page_request = parse_page_request(
            self._page_tokens,
            page_size=page_size,
            page_token=page_token,
            query=f"audit:user_id={uid or ''}",
            violations=violations,
        )
        if violations:
            raise ValidationFailed(violations)
        async with self._uow(write=False) as uow:
            rows = await uow.audit.list(
                limit=page_request.size + 1, after=page_request.cursor, user_id=uid
            )
        page, token = cut_page(self._page_tokens, page_request, rows)
        return AuditPage(events=page, next_page_token=token)
