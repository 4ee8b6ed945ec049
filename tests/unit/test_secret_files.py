"""Development secrets: created once, whole, private, even when processes race."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from usersvc.adapters.secret_files import create_once


def test_only_one_of_many_racing_writers_creates_the_file(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "secret"
    contents = [f"secret-{i}-".encode() * 1000 for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(lambda c: create_once(target, c), contents))
    assert created.count(True) == 1
    assert target.read_bytes() == contents[created.index(True)]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret"]  # no temp files left


def test_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    assert create_once(target, b"first")
    assert not create_once(target, b"second")
    assert target.read_bytes() == b"first"
