"""Validation and normalisation of user input; every rule in one place."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Sequence

from usersvc.domain.auth import KNOWN_ROLES
from usersvc.domain.errors import FieldViolation

EMAIL_MAX = 254
NAME_MIN, NAME_MAX = 2, 100
PASSWORD_MIN, PASSWORD_MAX = 8, 128

# Deliberately permissive (RFC 5322 is larger than anyone uses): one @, no spaces or control
# characters, a non-empty local part, and a domain of dot-separated non-empty labels.
_EMAIL_RE = re.compile(
    r"^[^@\s\x00-\x1f\x7f]{1,64}@(?:[^@\s.\x00-\x1f\x7f]{1,63}\.)+[^@\s.\x00-\x1f\x7f]{2,63}$"
)


def normalize_email(raw: str) -> str:
    """Trim, NFKC-normalise and lower-case, so case variants are one account."""
    return unicodedata.normalize("NFKC", raw.strip()).lower()


def check_email(raw: str, field: str = "email") -> tuple[str, FieldViolation | None]:
    email = normalize_email(raw)
    if not email:
        return email, FieldViolation(field, "email is required", "REQUIRED")
    if len(email) > EMAIL_MAX:
        return email, FieldViolation(
            field, f"email must be at most {EMAIL_MAX} characters", "TOO_LONG"
        )
    if not _EMAIL_RE.match(email):
        return email, FieldViolation(field, "email is not a valid address", "INVALID_FORMAT")
    return email, None


def check_name(raw: str, field: str = "name") -> tuple[str, FieldViolation | None]:
    name = raw.strip()
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return name, FieldViolation(
            field, "name must not contain control characters", "INVALID_FORMAT"
        )
    if not NAME_MIN <= len(name) <= NAME_MAX:
        return name, FieldViolation(
            field,
            f"name must be {NAME_MIN} to {NAME_MAX} characters after trimming",
            "OUT_OF_RANGE",
        )
    return name, None


def check_password(raw: str, field: str = "password") -> FieldViolation | None:
    """Length only (8 to 128 code points); no composition rules, never truncated."""
    if not PASSWORD_MIN <= len(raw) <= PASSWORD_MAX:
        return FieldViolation(
            field,
            f"password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters",
            "OUT_OF_RANGE",
        )
    return None


# Canonical form only: uuid.UUID() alone also reads "+2345...", "0x...", "1_..." and non-ASCII
# digits, which would map other strings onto ids.
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def parse_user_id(raw: str, field: str = "id") -> tuple[uuid.UUID | None, FieldViolation | None]:
    if not isinstance(raw, str) or not _UUID_RE.fullmatch(raw):
        return None, FieldViolation(field, "id must be a UUID", "INVALID_FORMAT")
    return uuid.UUID(raw), None


def check_roles(
    raw: Sequence[str], field: str = "roles"
) -> tuple[tuple[str, ...], FieldViolation | None]:
    """The roles sorted and without duplicates; a violation naming any unknown role."""
    roles = tuple(sorted(set(raw)))
    unknown = sorted(set(roles) - KNOWN_ROLES)
    if unknown:
        return roles, FieldViolation(
            field, f"unknown roles {unknown}; known: {sorted(KNOWN_ROLES)}", "UNKNOWN_ROLE"
        )
    return roles, None
