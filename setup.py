"""Ships the Alembic migrations inside the `usersvc` package of every built wheel.

The revisions live at the top of the repository (`migrations/`, as Alembic lays them out);
a non-editable install has no repository around it, so the build copies them to
`usersvc/migrations/`, where `usersvc.migrate` finds them. Editable installs read the
repository's directory directly. Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MIGRATIONS = ROOT / "migrations"


class BuildWithMigrations(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "usersvc" / "migrations"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(MIGRATIONS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithMigrations})
