"""UpdateUser field masks (AIP-134): which paths may be written, and the values they carry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from usersvc.domain.errors import FieldViolation
from usersvc.domain.labels import (
    LABELS_MAX,
    check_admin_metadata,
    check_label,
    check_labels,
)
from usersvc.domain.validation import check_email, check_name, check_roles

# Paths of User an UpdateUser mask may name, and the ones it may never name.
UPDATABLE_PATHS = frozenset(
    {"name", "email", "roles", "labels", "admin_metadata", "password_change_required"}
)
ADMIN_ONLY_PATHS = frozenset({"roles", "labels", "admin_metadata", "password_change_required"})
OUTPUT_ONLY_PATHS = frozenset(
    {"id", "state", "create_time", "update_time", "etag", "email_verified"}
)
# `labels.<key>`: sets that one label to user.labels[key], or removes it when absent there.
LABEL_PATH_PREFIX = "labels."


def admin_only(paths: Sequence[str]) -> bool:
    """Whether the mask names a path only admins may write."""
    return any(p in ADMIN_ONLY_PATHS or p.startswith(LABEL_PATH_PREFIX) for p in paths)


@dataclass(frozen=True, slots=True)
class MaskedUpdate:
    """The normalised values the mask selects, and everything wrong with the request.

    `label_edits` are the `labels.<key>` paths: {key: new value, or None to remove}; they
    apply to the stored labels (see `merged_labels`)."""

    values: dict[str, Any]
    violations: list[FieldViolation]
    label_edits: dict[str, str | None] = field(default_factory=dict)


def merged_labels(
    stored: Mapping[str, str], edits: Mapping[str, str | None]
) -> tuple[dict[str, str], FieldViolation | None]:
    """The stored labels with the edits applied; a violation when there are too many."""
    labels = dict(stored)
    for key, value in edits.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    if len(labels) > LABELS_MAX:
        return labels, FieldViolation(
            "user.labels", f"at most {LABELS_MAX} labels, got {len(labels)}", "TOO_MANY_LABELS"
        )
    return labels, None


def parse_update_mask(
    paths: Sequence[str],
    *,
    email: str,
    name: str,
    roles: Sequence[str],
    labels: Mapping[str, str] | None = None,
    admin_metadata: Mapping[str, Any] | None = None,
    password_change_required: bool = False,
) -> MaskedUpdate:
    """Check every path and the value it names; collect all violations at once."""
    violations: list[FieldViolation] = []
    if not paths:
        violations.append(
            FieldViolation("update_mask", "update_mask must name at least one field", "REQUIRED")
        )
    values: dict[str, Any] = {}
    edits: dict[str, str | None] = {}
    given_labels = labels or {}
    if "labels" in paths and any(p.startswith(LABEL_PATH_PREFIX) for p in paths):
        violations.append(
            FieldViolation(
                "update_mask",
                "name either 'labels' or 'labels.<key>' paths, not both",
                "CONFLICTING_PATHS",
            )
        )
    for path in paths:
        violation: FieldViolation | None = None
        if path.startswith(LABEL_PATH_PREFIX):
            key = path[len(LABEL_PATH_PREFIX) :]
            value = given_labels.get(key)
            violation = check_label(key, value, "user.labels")
            edits[key] = value
        elif path in OUTPUT_ONLY_PATHS:
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
        elif path == "labels":
            values["labels"], found = check_labels(given_labels, "user.labels")
            violations.extend(found)
        elif path == "admin_metadata":
            values["admin_metadata"], violation = check_admin_metadata(
                admin_metadata or {}, "user.admin_metadata"
            )
        elif path == "password_change_required":
            values["password_change_required"] = password_change_required
        if violation is not None:
            violations.append(violation)
    return MaskedUpdate(values=values, violations=violations, label_edits=edits)
