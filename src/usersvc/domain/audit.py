"""Audit events: who changed what, when; secrets redacted in one place."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

USER_CREATED = "user.created"
USER_UPDATED = "user.updated"
USER_ROLES_CHANGED = "user.roles_changed"
USER_DELETED = "user.deleted"
USER_PASSWORD_CHANGED = "user.password_changed"
USER_DISABLED = "user.disabled"
USER_ENABLED = "user.enabled"
USER_UNLOCKED = "user.unlocked"
USER_UNDELETED = "user.undeleted"
USER_PURGED = "user.purged"
USER_VERIFICATION_EMAIL_SENT = "user.verification_email_sent"
USER_EMAIL_VERIFIED = "user.email_verified"
USER_RECOVERY_CODE_CREATED = "user.recovery_code_created"
USER_PASSWORD_RECOVERED = "user.password_recovered"
LOGIN_SUCCEEDED = "auth.login_succeeded"
LOGIN_FAILED = "auth.login_failed"

SYSTEM_ACTOR = "system"
ANONYMOUS_ACTOR = "anonymous"

# The redaction list: values of these fields are never stored, only the fact that they changed.
REDACTED_FIELDS = frozenset(
    {
        "password",
        "password_hash",
        "new_password",
        "current_password",
        "token",
        "access_token",
        "refresh_token",
        "token_hash",
        # One-time codes are never put in a record at all; their stored hashes neither. ("code"
        # itself is not listed: log lines use it for the status code of a call.)
        "code_hash",
    }
)
REDACTED = "[REDACTED]"

# Purging a soft-deleted user rewrites its audit trail, the one sanctioned change of audit rows:
# the values of these fields become PURGED; action, actor, time and request id stay.
PERSONAL_FIELDS = frozenset({"email", "name"})
PURGED = "[PURGED]"


def tombstone(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` with every non-null value of a personal field replaced by PURGED."""
    out: dict[str, Any] = {}
    for name, change in changes.items():
        if name in PERSONAL_FIELDS and isinstance(change, dict):
            out[name] = {k: (PURGED if v is not None else None) for k, v in change.items()}
        else:
            out[name] = change
    return out


def redact(changes: dict[str, tuple[Any, Any]]) -> dict[str, dict[str, Any]]:
    """{field: {"old": ..., "new": ...}} with every secret replaced by a marker."""
    out: dict[str, dict[str, Any]] = {}
    for name, (old, new) in changes.items():
        if name in REDACTED_FIELDS:
            out[name] = {"old": REDACTED, "new": REDACTED}
        else:
            out[name] = {"old": old, "new": new}
    return out


@dataclass(frozen=True, slots=True)
class AuditEvent:
    user_id: uuid.UUID | None
    action: str
    changes: dict[str, dict[str, Any]]
    actor: str
    request_id: str
    create_time: datetime
    id: uuid.UUID = field(default_factory=uuid.uuid4)


def change_event(
    *,
    user_id: uuid.UUID,
    action: str,
    changes: dict[str, tuple[Any, Any]],
    actor: str,
    request_id: str,
    now: datetime,
) -> AuditEvent:
    """The audit event of one change: {field: (old, new)} with the secrets redacted."""
    return AuditEvent(
        user_id=user_id,
        action=action,
        changes=redact(changes),
        actor=actor,
        request_id=request_id,
        create_time=now,
    )
