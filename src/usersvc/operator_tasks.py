"""Operator tasks behind the CLI: the first admin, service accounts and their tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass

from usersvc.bootstrap import Components
from usersvc.context import request_id_var
from usersvc.domain.auth import ADMIN, SERVICE, SYSTEM, RequestContext
from usersvc.domain.errors import FailedPrecondition, FieldViolation, ValidationFailed
from usersvc.domain.models import UserState, UserView

SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SERVICE_EMAIL_DOMAIN = "service.invalid"  # RFC 2606: can never receive mail


@dataclass(frozen=True)
class AdminResult:
    user: UserView
    created: bool
    already_admin: bool = False


async def create_admin(c: Components, *, email: str, name: str, password: str) -> AdminResult:
    """Create an admin, or grant the admin role to the existing account with this e-mail
    (whose password then stays as it is)."""
    existing = await c.users.get_user_by_email(email)
    if existing is not None:
        if ADMIN in existing.roles:
            return AdminResult(existing, created=False, already_admin=True)
        granted = await c.users.add_roles(user_id=existing.id, roles=[ADMIN], ctx=_operator())
        return AdminResult(granted, False)
    user = await c.users.create_user(
        ctx=_operator(), email=email, name=name, password=password, roles=[ADMIN]
    )
    return AdminResult(user, True)


async def issue_service_token(c: Components, *, subject: str, ttl_seconds: int) -> str:
    """A service-role access token for the service account `subject` (created if needed).

    Service accounts cannot log in with a password; disabling or deleting one revokes its
    tokens like any user's.
    """
    if not SERVICE_NAME.match(subject):
        raise ValidationFailed(
            [FieldViolation("subject", "lower-case letters, digits and dashes, 1-63 characters")]
        )
    email = f"{subject}@{SERVICE_EMAIL_DOMAIN}"
    user = await c.users.get_user_by_email(email)
    if user is None:
        name = subject if len(subject) >= 2 else f"{subject}-service"
        user = await c.users.create_user(
            ctx=_operator(), email=email, name=name, password=None, roles=[SERVICE]
        )
    if SERVICE not in user.roles:
        raise FailedPrecondition(f"{email} exists but is not a service account")
    if user.state is not UserState.ACTIVE:
        # Disabled, or soft-deleted (its e-mail stays taken until the purge).
        raise FailedPrecondition(f"service account {subject} is {user.state.value}")
    token, _ = c.access_tokens.issue(
        subject=user.id, roles=user.roles, version=user.token_version, ttl_seconds=ttl_seconds
    )
    return token


def _operator() -> RequestContext:
    """The operator tooling acting on its own authority, under the CLI's request id."""
    return RequestContext(SYSTEM, request_id=request_id_var.get())
