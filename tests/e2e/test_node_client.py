"""A Node.js caller (@grpc/grpc-js, the contract loaded from proto/) against a real server.

Needs Node.js and `npm ci` in tests/node (`make test` does it when npm is installed). Skipped
without them, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import ADMIN_PASSWORD, ServerThread

NODE_DIR = Path(__file__).resolve().parents[1] / "node"

# The Node.js caller's view does not depend on the database behind the server.
pytestmark = pytest.mark.one_backend


def node_or_skip() -> str:
    """The node executable, once tests/node's dependencies are installed."""
    node = shutil.which("node")
    missing = (
        "Node.js is not installed"
        if node is None
        else "tests/node has no node_modules (run `make test` or `npm ci` there)"
        if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
        else None
    )
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Node.js test must run in CI: {missing}")
        pytest.skip(missing)
    assert node is not None
    return node


def test_node_client_logs_in_creates_gets_lists_and_reads_error_details(
    server: ServerThread,
) -> None:
    node = node_or_skip()
    env = {
        **os.environ,
        "ADDR": server.address,
        "USERSVC_EMAIL": ADMIN_EMAIL,
        "USERSVC_PASSWORD": ADMIN_PASSWORD,
    }
    result = subprocess.run(
        [node, str(NODE_DIR / "calls.mjs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)

    assert seen["fetched"]["id"] == seen["created"]["id"]
    assert seen["fetched"]["state"] == "USER_STATE_ACTIVE"
    assert seen["created"]["id"] in seen["listed"]

    failure = seen["failure"]
    assert failure["code"] == 3  # INVALID_ARGUMENT
    details = {d["type"]: d for d in failure["details"]}
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    assert details["google.rpc.ErrorInfo"]["domain"] == "usersvc"
    assert details["google.rpc.RequestInfo"]["requestId"]
    violations = details["google.rpc.BadRequest"]["fieldViolations"]
    assert {v["field"] for v in violations} == {"email", "name", "password"}
