"""UpdateUser field masks (AIP-134): which paths may be written, and the values they carry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from usersvc.domain.errors import FieldViolation
from usersvc.domain.validation import check_email, check_name, check_roles

# Paths of User an UpdateUser mask may name, and the ones it may never name.
UPDATABLE_PATHS = frozenset({"name", "email", "roles"})
ADMIN_ONLY_PATHS = frozenset({"roles"})
OUTPUT_ONLY_PATHS = frozenset({"id", "state", "create_time", "update_time", "etag"})


@dataclass(frozen=True, slots=True)
class MaskedUpdate:
    """The normalised values the mask selects, and everything wrong with the request."""

    values: dict[str, Any]
    violations: list[FieldViolation]


def parse_update_mask(
    paths: Sequence[str], *, email: str, name: str, roles: Sequence[str]
) -> MaskedUpdate:
    """Check every path and the value it names; collect all violations at once."""
    violations: list[FieldViolation] = []
    if not paths:
        violations.append(
            FieldViolation("update_mask", "update_mask must name at least one field", "REQUIRED")
        )
    values: dict[str, Any] = {}
    for path in paths:
        violation: FieldViolation | None = None
        if path in OUTPUT_ONLY_PATHS:
            violation = FieldViolation(
                "update_mask", f"{path!r} cannot be updated", "IMMUTABLE_FIELD"
            )
        elif path not in UPDATABLE_PATHS:
            violation = FieldViolation("update_mask", f"unknown field {path!r}", "UNKNOWN_FIELD")
        elif path == "email":
            values["email"], violation = check_email(email, "user.email")
        elif path == "name":
            values["name"], violation = check_name(name, "user.name")
        elif path == "roles":
            checked, violation = check_roles(roles, "user.roles")
            values["roles"] = list(checked)
        if violation is not None:
            violations.append(violation)
    return MaskedUpdate(values=values, violations=violations)
