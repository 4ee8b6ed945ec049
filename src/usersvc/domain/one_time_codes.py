"""One-time codes sent by mail: e-mail verification and admin-initiated password recovery.

A code is 32 random bytes (256 bits, 43 base64url characters): far too many to guess, so a
plain SHA-256 of it is a safe thing to store (as for refresh tokens), and the code itself is
only ever in the mail. Wrong attempts are still counted and a code burns after a few of them,
so that not even a leaked partial code can be tried for long.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime

CODE_BYTES = 32
# token_urlsafe(32) is 43 characters; anything longer is not one of ours.
CODE_MAX_CHARS = 64


class CodePurpose(enum.StrEnum):
    VERIFY_EMAIL = "verify_email"
    RECOVER_PASSWORD = "recover_password"


def new_code() -> str:
    return secrets.token_urlsafe(CODE_BYTES)


def hash_code(code: str) -> str:
    """The stored form of a code (64 hex digits)."""
    return hashlib.sha256(code.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class OneTimeCode:
    """A stored code: its hash, whom and what it is for, until when; never the code."""

    user_id: uuid.UUID
    purpose: CodePurpose
    code_hash: str
    # The address the code was mailed to: a verification code verifies only that address.
    email: str
    create_time: datetime
    expire_time: datetime
    used_time: datetime | None = None
    failed_attempts: int = 0
    id: uuid.UUID = field(default_factory=uuid.uuid4)
