"""Development secrets written once, atomically, readable by the owner only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def create_once(path: Path, content: bytes) -> bool:
    """Write `content` to `path` unless it exists; True if this call created it.

    The file appears complete or not at all (written aside, then hard-linked into place), so
    processes starting together never read a half-written secret, and only one wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)
