"""Bounds of a user's labels and admin metadata; every rule in one place.

Labels follow the Kubernetes/GCP shape: a key starts with a lower-case ASCII letter and holds
1 to 63 characters of [a-z0-9_-]; a value holds 0 to 63 characters of the same set; at most
64 labels per user. Admin metadata is a JSON object of at most 8 KiB (compact UTF-8 JSON),
nested at most 8 levels deep, with keys of 1 to 128 characters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from usersvc.domain.errors import FieldViolation

LABELS_MAX = 64
LABEL_KEY_MAX = 63
LABEL_VALUE_MAX = 63
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
# Violations named per label; the rest of a bad map is counted in one more.
REPORTED_LABELS_MAX = 5
# Echoed keys are cut to this many characters.
ECHO_MAX = 40

ADMIN_METADATA_MAX_BYTES = 8192
ADMIN_METADATA_MAX_DEPTH = 8
ADMIN_METADATA_KEY_MAX = 128
# Control characters other than tab and line breaks; NUL is one (PostgreSQL's jsonb has no
# room for it).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _echo(text: str) -> str:
    text = text if len(text) <= ECHO_MAX else text[: ECHO_MAX - 1] + "…"
    return json.dumps(text, ensure_ascii=True)


def is_label_key(key: str) -> bool:
    return _LABEL_KEY.fullmatch(key) is not None


def is_label_value(value: str) -> bool:
    return _LABEL_VALUE.fullmatch(value) is not None


def label_field(field: str, key: str) -> str:
    """The violation path of one label, such as `user.labels["team"]` (key cut and quoted)."""
    return f"{field}[{_echo(key)}]"


def check_label(key: str, value: str | None, field: str) -> FieldViolation | None:
    """One label (value None: only the key is checked)."""
    if not is_label_key(key):
        return FieldViolation(
            label_field(field, key),
            f"label keys are 1 to {LABEL_KEY_MAX} characters of a-z, 0-9, '_' and '-', "
            "starting with a letter",
            "INVALID_LABEL_KEY",
        )
    if value is not None and not is_label_value(value):
        return FieldViolation(
            label_field(field, key),
            f"label values are 0 to {LABEL_VALUE_MAX} characters of a-z, 0-9, '_' and '-'",
            "INVALID_LABEL_VALUE",
        )
    return None


def check_labels(
    raw: Mapping[str, str], field: str = "labels"
) -> tuple[dict[str, str], list[FieldViolation]]:
    """The labels as a plain dict, and every violation (the first few named, the rest counted)."""
    labels = dict(raw)
    violations: list[FieldViolation] = []
    if len(labels) > LABELS_MAX:
        violations.append(
            FieldViolation(
                field, f"at most {LABELS_MAX} labels, got {len(labels)}", "TOO_MANY_LABELS"
            )
        )
    bad = 0
    for key in sorted(labels):
        violation = check_label(key, labels[key], field)
        if violation is None:
            continue
        bad += 1
        if bad <= REPORTED_LABELS_MAX:
            violations.append(violation)
    if bad > REPORTED_LABELS_MAX:
        violations.append(
            FieldViolation(
                field, f"{bad - REPORTED_LABELS_MAX} more bad labels not listed", "INVALID_LABEL"
            )
        )
    return labels, violations


class _TooDeep(ValueError):
    pass


def _check_json(value: Any, depth: int, path: str) -> str | None:
    """Why `value` (nested `depth` levels deep) is out of bounds, or None."""
    if isinstance(value, dict):
        if depth > ADMIN_METADATA_MAX_DEPTH:
            raise _TooDeep()
        for key, item in value.items():
            if not isinstance(key, str) or not 1 <= len(key) <= ADMIN_METADATA_KEY_MAX:
                return f"keys are 1 to {ADMIN_METADATA_KEY_MAX} characters (at {path})"
            if _CONTROL.search(key):
                return f"keys must not contain control characters (at {path})"
            problem = _check_json(item, depth + 1, f"{path}.{key[:ECHO_MAX]}")
            if problem:
                return problem
    elif isinstance(value, list):
        if depth > ADMIN_METADATA_MAX_DEPTH:
            raise _TooDeep()
        for index, item in enumerate(value):
            problem = _check_json(item, depth + 1, f"{path}[{index}]")
            if problem:
                return problem
    elif isinstance(value, str):
        if _CONTROL.search(value):
            return f"strings must not contain control characters (at {path})"
    elif isinstance(value, float) and not math.isfinite(value):
        return f"numbers must be finite (at {path})"
    elif value is not None and not isinstance(value, bool | int | float):
        return f"unsupported value (at {path})"
    return None


def check_admin_metadata(
    raw: Mapping[str, Any], field: str = "admin_metadata"
) -> tuple[dict[str, Any], FieldViolation | None]:
    """The metadata as a plain dict, and why it is out of bounds (depth, size, keys)."""
    metadata = dict(raw)
    try:
        problem = _check_json(metadata, 1, "$")
    except _TooDeep:
        return metadata, FieldViolation(
            field,
            f"admin_metadata may nest at most {ADMIN_METADATA_MAX_DEPTH} levels deep",
            "TOO_DEEP",
        )
    if problem:
        return metadata, FieldViolation(field, f"admin_metadata {problem}", "INVALID_METADATA")
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode())
    if size > ADMIN_METADATA_MAX_BYTES:
        return metadata, FieldViolation(
            field,
            f"admin_metadata must be at most {ADMIN_METADATA_MAX_BYTES} bytes as compact JSON, "
            f"got {size}",
            "TOO_LARGE",
        )
    return metadata, None
