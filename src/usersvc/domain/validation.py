"""Validation and normalisation of user input; every rule in one place."""

from __future__ import annotations

import functools
import re
import unicodedata
import uuid
from collections.abc import Sequence
from typing import Any

from email_validator import EmailNotValidError, validate_email

from usersvc.domain.auth import KNOWN_ROLES
from usersvc.domain.errors import FieldViolation

EMAIL_MAX = 254
NAME_MIN, NAME_MAX = 2, 100
PASSWORD_MIN, PASSWORD_MAX = 8, 128

# Reserved (RFC 2606) domains email-validator refuses, which this service uses on purpose for
# accounts that are never mailed (service accounts).
RESERVED_DOMAINS_IN_USE = frozenset({"service.invalid"})
_STAND_IN_DOMAIN = "reserved.example.com"


def has_format_characters(text: str) -> bool:
    """Invisible format characters (Unicode category Cf: zero-width space, joiners, bidi
    controls, soft hyphen...), which make two different strings look the same."""
    return any(unicodedata.category(ch) == "Cf" for ch in text)


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
    if has_format_characters(email):
        return email, FieldViolation(
            field, "email must not contain invisible format characters", "INVISIBLE_CHARACTER"
        )
    local, at, domain = email.rpartition("@")
    checked = f"{local}@{_STAND_IN_DOMAIN}" if at and domain in RESERVED_DOMAINS_IN_USE else email
    try:
        # Syntax only: no DNS lookups on the request path. IDNA-aware, so internationalised
        # addresses work and their domains come back in one normal form.
        result = validate_email(
            checked,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_quoted_local=False,
            strict=True,
        )
    except EmailNotValidError as err:
        return email, FieldViolation(
            field, f"email is not a valid address: {err}", "INVALID_FORMAT"
        )
    if len(result.ascii_domain.rsplit(".", 1)[-1]) < 2:  # no top-level domain has one letter
        return email, FieldViolation(field, "email is not a valid address", "INVALID_FORMAT")
    if checked is not email:
        return email, None
    return result.normalized.lower(), None


@functools.cache
def _spoof_checker() -> Any:
    import icu

    return icu.SpoofChecker()


def email_skeleton(email: str) -> str:
    """The Unicode TS #39 confusable skeleton of a normalised address, computed by ICU: two
    addresses look alike exactly when their skeletons are equal ("bob" spelt with a Cyrillic o,
    "exarnple" for "example")."""
    return str(_spoof_checker().getSkeleton(0, email))


def check_name(raw: str, field: str = "name") -> tuple[str, FieldViolation | None]:
    name = raw.strip()
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return name, FieldViolation(
            field, "name must not contain control characters", "INVALID_FORMAT"
        )
    # Joiners inside a name are real (emoji, Indic scripts); at its edges they only hide.
    if name and (has_format_characters(name[0]) or has_format_characters(name[-1])):
        return name, FieldViolation(
            field,
            "name must not begin or end with invisible format characters",
            "INVISIBLE_CHARACTER",
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
