"""The README's "Calling usersvc" section, run as written against a test server: every sh,
python and js block, so that the examples cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_buf_curl import buf_command
from tests.e2e.test_node_client import NODE_DIR, node_or_skip
from tests.support import ADMIN_PASSWORD, ServerThread, ensure_admin, make_settings

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Calling usersvc"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else None]
    return [
        (m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    ]


@pytest.fixture(scope="module")
def readme_server(sqlite_url: str) -> Iterator[ServerThread]:
    """A server of its own: the examples create fixed e-mail addresses."""
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir)
        ensure_admin(settings)
        server = ServerThread(settings).start()
        yield server
        server.stop()


def _env(server: ServerThread) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "ADDR": server.address,
        "USERSVC_PASSWORD": ADMIN_PASSWORD,
        # python3 is the one with the API package, as after `. .venv/bin/activate`.
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _run(args: list[str], server: ServerThread, *, cwd: Path | str, stdin: str = "") -> str:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=_env(server),
        cwd=cwd,
        input=stdin,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_section_has_every_kind_of_example() -> None:
    languages = [language for language, _ in readme_blocks()]
    assert languages.count("python") == 1
    assert languages.count("js") == 1
    assert languages.count("sh") >= 2


def test_the_readme_uses_the_makefiles_buf() -> None:
    shell = "\n".join(code for language, code in readme_blocks() if language == "sh")
    assert " ".join(buf_command()) + ' "$@"' in shell


def test_shell_examples(readme_server: ServerThread) -> None:
    if shutil.which("jq") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("jq is needed for the README's shell examples in CI")
        pytest.skip("jq is not installed")
    buf_command()  # skips without npx
    shell = "\n".join(code for language, code in readme_blocks() if language == "sh")
    with tempfile.TemporaryDirectory() as empty:
        out = _run(
            ["bash", "-e", "-u", "-c", shell],
            readme_server,
            stdin=f"{ADMIN_PASSWORD}\n",
            cwd=empty,
        )
    assert "userservice.v1.UserService/GetUser" in out
    assert '"email": "ada@example.com"' in out
    assert '"name": "Ada King"' in out
    # BatchGetUsers: the duplicate kept, the unknown id listed as missing
    assert '["ada@example.com","ada@example.com",["00000000-0000-4000-8000-000000000000"]]' in out
    assert "filtered: ada@example.com" in out
    # BatchCreateUsers: one status per entry; the imported bcrypt hash logs in
    assert '[{"code":0,"email":"hedy@example.com"},{"code":3,"email":null}]' in out
    assert "imported login: true" in out
    assert "user.created" in out and "user.updated" in out
    assert '"fieldViolations"' in out and '"field": "password"' in out
    assert '"status": "SERVING"' in out


def test_python_example(readme_server: ServerThread) -> None:
    (code,) = [code for language, code in readme_blocks() if language == "python"]
    with tempfile.TemporaryDirectory() as elsewhere:
        out = _run([sys.executable, "-c", code], readme_server, cwd=elsewhere)
    assert "grace@example.com" in out
    assert "INVALID_ARGUMENT request id" in out
    assert "  password: " in out
    assert "roles ['admin']" in out
    assert "created margaret@example.com" in out
    assert "entry failed: INVALID_ARGUMENT {'users[1].email': " in out
    assert "['margaret@example.com', 'grace@example.com']" in out
    assert "recovery code valid until 20" in out


def test_node_example(readme_server: ServerThread) -> None:
    node = node_or_skip()
    (code,) = [code for language, code in readme_blocks() if language == "js"]
    # Beside tests/node's node_modules, where Node.js resolves the example's imports.
    script = NODE_DIR / f"readme-example-{uuid.uuid4().hex[:8]}.mjs"
    script.write_text(code)
    try:
        out = _run([node, str(script)], readme_server, cwd=ROOT)
    finally:
        script.unlink()
    assert "katherine@example.com" in out
    assert "BadRequest" in out and '"field":"email"' in out
    assert "ErrorInfo" in out and '"reason":"INVALID_ARGUMENT"' in out
