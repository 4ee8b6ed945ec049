"""A built wheel, installed outside the repository, can migrate a database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from alembic.script import ScriptDirectory

from usersvc.migrate import alembic_config

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_migrates_a_fresh_database(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(ROOT)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("usersvc-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies come from this environment (appended after the new venv's own
    # site-packages, so the installed wheel, not the checkout, provides `usersvc`).
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        capture_output=True,
    )

    database = tmp_path / "db.sqlite3"
    env = {
        "PATH": os.environ["PATH"],
        "USERSVC_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "USERSVC_DATA_DIR": str(tmp_path / "data"),
    }
    where = subprocess.run(
        [str(python), "-c", "import usersvc.migrate as m; print(m.migrations_dir())"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert where.startswith(site), where

    result = subprocess.run(
        [str(env_dir / "bin" / "usersvc"), "migrate"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"users", "outbox", "audit_events"} <= tables
    head = ScriptDirectory.from_config(alembic_config(str(database))).get_current_head()
    assert version == head
