"""Callers and roles."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

ADMIN = "admin"
SERVICE = "service"
KNOWN_ROLES = frozenset({ADMIN, SERVICE})
# The access-token claim set (true) while the user must change its password
# (User.password_change_required): such a token may change the password and nothing else.
PASSWORD_CHANGE_REQUIRED_CLAIM = "pcr"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: uuid.UUID
    roles: frozenset[str]
    # The token carries "pcr": it may change the password and nothing else.
    password_change_required: bool = False

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    def is_self(self, user_id: uuid.UUID) -> bool:
        return self.user_id == user_id

    @property
    def audit_name(self) -> str:
        """How the audit trail names this caller."""
        return "system" if self.user_id == SYSTEM_ID else str(self.user_id)


SYSTEM_ID = uuid.UUID(int=0)
# The operator tooling (CLI) acting on its own authority.
SYSTEM = Principal(user_id=SYSTEM_ID, roles=frozenset({ADMIN}))


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    access_expires_at: float
    refresh_token: str
    refresh_expires_at: float


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking, and the request id every record of the call carries."""

    actor: Principal
    request_id: str = "-"
