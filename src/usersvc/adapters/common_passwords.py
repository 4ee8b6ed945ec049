"""The shipped list of common passwords (see data/README.md)."""

from __future__ import annotations

import gzip
from importlib import resources


def load_common_passwords() -> frozenset[str]:
    """Every listed password, lower-case; read once at start-up."""
    raw = (resources.files("usersvc") / "data" / "common-passwords.txt.gz").read_bytes()
    return frozenset(line.strip() for line in gzip.decompress(raw).decode().splitlines() if line)
