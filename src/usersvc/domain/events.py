"""Events announced through the outbox."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Outbox topic announcing a new user (the welcome e-mail); not the audit action of that name.
TOPIC_USER_CREATED = "user.created"
# Payload keys that hold secrets (the codes below). They exist only while a row waits to be
# sent: settling a row (delivered, failed, skipped) removes them, so that a database dump or
# backup holds no code that was ever mailed.
SECRET_PAYLOAD_KEYS = ("code",)
# The mail with an e-mail verification code. Its payload holds the code: the outbox row is the
# one place the code exists outside the mail, until the row is settled.
TOPIC_EMAIL_VERIFICATION = "user.email_verification"
# The mail with a password recovery code (CreateRecoveryCode); its payload holds the code too.
TOPIC_PASSWORD_RECOVERY = "user.password_recovery"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message to deliver; `id` doubles as the stable e-mail Message-ID."""

    topic: str
    aggregate_id: uuid.UUID
    payload: dict[str, Any]
    request_id: str
    create_time: datetime
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    attempts: int = 0
