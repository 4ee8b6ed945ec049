"""Records that cross the boundary between the service layer and its stores."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class RefreshTokenStatus(enum.StrEnum):
    """active -> used (rotated) | revoked (logout, reuse, password or role change)."""

    ACTIVE = "active"
    USED = "used"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class RefreshTokenRecord:
    id: uuid.UUID
    user_id: uuid.UUID
    family_id: uuid.UUID
    status: RefreshTokenStatus
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A remembered CreateUser: the request's fingerprint and the created user's public fields."""

    fingerprint: str
    result: dict[str, Any]
    create_time: datetime


class OutboxStatus(enum.StrEnum):
    """pending until settled as delivered, failed (attempts used up) or skipped (nothing to
    deliver any more, e.g. the user is gone)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class ClaimedOutboxMessage:
    """A pending row this dispatcher holds until `claimed_until`, with its user as of the claim.

    `user_email`/`user_name` are the user's current values (None when the user no longer
    exists), so an address corrected before delivery gets the mail, a deleted user none.
    """

    id: uuid.UUID
    topic: str
    aggregate_id: uuid.UUID
    payload: dict[str, Any]
    request_id: str
    attempts: int
    create_time: datetime
    claimed_until: datetime
    user_email: str | None
    user_name: str | None
    # W3C traceparent of the call that wrote the row, if that call was traced.
    trace_context: str | None = None
