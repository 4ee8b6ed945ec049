"""buf curl, pinned as in the Makefile, against a running server with no proto files at hand:
everything it knows comes from server reflection (v1, without falling back to v1alpha)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import ADMIN_PASSWORD, ServerThread, login

# What buf curl sees comes from reflection, not from storage.
pytestmark = pytest.mark.one_backend

ROOT = Path(__file__).resolve().parents[2]


def buf_command() -> list[str]:
    """The Makefile's buf (npx and a pinned @bufbuild/buf), so that both use one version."""
    match = re.search(r"^BUF := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile defines BUF"
    command = match.group(1).split()
    if shutil.which(command[0]) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{command[0]} is needed for the buf curl test in CI")
        pytest.skip(f"{command[0]} is not installed")
    return command


def buf_curl(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as empty:  # no buf.yaml, no protos
        return subprocess.run(
            [*buf_command(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args],
            capture_output=True,
            text=True,
            cwd=empty,
            timeout=300,
            check=False,
        )


def test_lists_every_service_over_reflection_v1(server: ServerThread) -> None:
    result = buf_curl(
        "--reflect-protocol", "grpc-v1", "--list-services", f"http://{server.address}"
    )
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "userservice.v1.AuthService",
        "userservice.v1.UserService",
    }


def test_calls_get_user_and_health_check(server: ServerThread, channel: grpc.Channel) -> None:
    token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
    url = f"http://{server.address}"
    listed = buf_curl(
        "--reflect-protocol",
        "grpc-v1",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps({"email": ADMIN_EMAIL}),
        f"{url}/userservice.v1.UserService/ListUsers",
    )
    assert listed.returncode == 0, listed.stderr
    (admin,) = json.loads(listed.stdout)["users"]

    got = buf_curl(
        "--reflect-protocol",
        "grpc-v1",
        "-H",
        f"authorization: Bearer {token}",
        "-d",
        json.dumps({"id": admin["id"]}),
        f"{url}/userservice.v1.UserService/GetUser",
    )
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["user"]["email"] == ADMIN_EMAIL

    health = buf_curl(
        "--reflect-protocol",
        "grpc-v1",
        "-d",
        json.dumps({"service": "userservice.v1.UserService"}),
        f"{url}/grpc.health.v1.Health/Check",
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
