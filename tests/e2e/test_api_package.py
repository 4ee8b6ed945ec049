"""The API package on its own: its wheel, installed into a fresh virtual environment without
the server, talks to a running server."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.support import ADMIN_PASSWORD, ServerThread, ensure_admin, make_settings

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "generated"


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheels() -> Iterator[Path]:
    """The API wheel and the server wheel, built from this checkout."""
    with tempfile.TemporaryDirectory(prefix="usersvc-wheels-") as tmp:
        _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp, API, ROOT)
        yield Path(tmp)


@pytest.fixture(scope="module")
def api_venv(wheels: Path) -> Iterator[Path]:
    """A new virtual environment holding the API wheel and its dependencies, nothing else."""
    with tempfile.TemporaryDirectory(prefix="usersvc-api-") as tmp:
        (wheel,) = wheels.glob("userservice_api-*.whl")
        venv = Path(tmp) / "venv"
        _run(sys.executable, "-m", "venv", venv)
        _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[jwt]")
        yield venv


def test_the_wheel_brings_only_the_contract_and_its_four_dependencies(api_venv: Path) -> None:
    python = api_venv / "bin" / "python"
    listing = json.loads(_run(python, "-m", "pip", "list", "--format=json"))
    names = {p["name"].lower() for p in listing}
    assert "userservice-api" in names
    assert not names & {"usersvc", "sqlalchemy", "alembic", "psycopg", "argon2-cffi"}
    requires = _run(
        python,
        "-c",
        "from importlib.metadata import requires; print('\\n'.join(requires('userservice-api')))",
    ).split("\n")
    base = {r.split(">")[0].split("=")[0].split("<")[0] for r in requires if r and "extra" not in r}
    assert base == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
    version = _run(
        python, "-c", "from importlib.metadata import version as v; print(v('userservice-api'))"
    )
    declared = tomllib.loads((API / "pyproject.toml").read_text())["project"]["version"]
    assert version.strip() == declared
    # Type information ships with it.
    _run(
        python,
        "-c",
        "import importlib.resources as r; "
        "assert r.files('userservice.v1').joinpath('user_pb2.pyi').is_file(); "
        "assert r.files('userservice').joinpath('py.typed').is_file()",
    )


def test_the_server_wheel_depends_on_the_api_wheel_instead_of_holding_it(wheels: Path) -> None:
    (server,) = wheels.glob("usersvc-*.whl")
    (api,) = wheels.glob("userservice_api-*.whl")
    with zipfile.ZipFile(server) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            Requirement(line.removeprefix("Requires-Dist: "))
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]
    assert not [n for n in names if n.startswith("userservice/")], "stubs belong to the API wheel"
    (contract,) = [r for r in requires if r.name == "userservice-api"]
    api_version = api.name.split("-")[1]
    assert contract.specifier.contains(api_version), f"{contract} refuses {api_version}"


def test_the_contract_version_matches_the_proto_package() -> None:
    version = tomllib.loads((API / "pyproject.toml").read_text())["project"]["version"]
    packages = {
        line.split()[1].rstrip(";")
        for proto in (ROOT / "proto").rglob("*.proto")
        # google/rpc/status.proto is imported by the contract, not part of it.
        if "google" not in proto.relative_to(ROOT / "proto").parts
        for line in proto.read_text().splitlines()
        if line.startswith("package ")
    }
    assert packages == {"userservice.v1"}
    assert version.split(".")[0] == "1"


def test_a_fresh_environment_calls_a_running_server(api_venv: Path, sqlite_url: str) -> None:
    script = textwrap.dedent(
        """
        import json, sys, uuid
        import userservice
        from userservice.client import Client, InvalidArgument
        from userservice.client.jwks import JwksVerifier

        address, password = sys.argv[1], sys.argv[2]
        tokens = Client(address).login("admin@example.com", password)
        with Client(address, token=lambda: tokens.access_token) as client:
            email = f"fresh-{uuid.uuid4().hex[:8]}@example.com"
            user = client.create_user(email=email, name="Fresh", password="unusual-pass-4217")
            assert client.get_user(user.id).email == email
            listed = [u.id for u in client.iter_users(page_size=1)]
            try:
                client.create_user(email="nope", name="A", password="short")
            except InvalidArgument as err:
                violations = sorted(err.violations)
            claims = JwksVerifier(client.get_jwks).verify(tokens.access_token)
        try:
            import usersvc  # noqa: F401
            server_importable = True
        except ImportError:
            server_importable = False
        print(json.dumps({
            "module": userservice.__file__,
            "created": user.id,
            "listed": listed,
            "violations": violations,
            "sub": claims["sub"],
            "server_importable": server_importable,
        }))
        """
    )
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir)
        ensure_admin(settings)
        server = ServerThread(settings).start()
        try:
            out = _run(
                api_venv / "bin" / "python",
                "-c",
                script,
                server.address,
                ADMIN_PASSWORD,
                cwd=Path(data_dir),
            )
        finally:
            server.stop()
    result = json.loads(out)
    assert result["module"].startswith(str(api_venv))
    assert result["server_importable"] is False
    assert result["created"] in result["listed"]
    assert result["violations"] == ["email", "name", "password"]
    assert result["sub"]
