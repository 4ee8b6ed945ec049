"""The image, really built and run: Health/Check and an authenticated GetUser through the
published port, non-root on a read-only root filesystem, and a clean stop on SIGTERM.

Needs a Docker daemon and a base image built from Debian packages (no registry pull):
`make test-container` prepares both (tests/container/prepare.sh) and runs this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import TEST_SECRET, TEST_SIGNING_KEY, with_bearer
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("USERSVC_TEST_BASE_IMAGE", "usersvc-test-base:bookworm")
UID = "10001"
GRACE_SECONDS = 10


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True, check=False).returncode
    ):
        pytest.fail("no Docker daemon: run `make test-container`, which starts one")
    if not docker("image", "ls", "-q", BASE_IMAGE):
        pytest.fail(f"no base image {BASE_IMAGE}: run tests/container/prepare.sh")
    context = tmp_path_factory.mktemp("image")
    # Wheels built here, on the host: the build needs no network.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(context / "dist" / "wheels"),
            # The API package first: the server requires it by name, from no index.
            str(ROOT / "generated"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    tag = f"usersvc-test:{uuid.uuid4().hex[:12]}"
    docker(
        "build",
        "--quiet",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--file",
        str(ROOT / "Dockerfile"),
        "--tag",
        tag,
        str(context),
        timeout=600,
    )
    try:
        yield tag
    finally:
        docker("image", "rm", "--force", tag, check=False)
        # The classic builder keeps the install stage as an untagged image; only ours.
        docker("image", "prune", "--force", "--filter", "label=usersvc.stage=install", check=False)


@pytest.fixture(scope="module")
def container(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys")
    key = keys / "jwt-signing-key.pem"
    key.write_bytes(TEST_SIGNING_KEY.read_bytes())
    key.chmod(0o644)  # readable by the image's user, as a mounted Secret with fsGroup is
    keys.chmod(0o755)
    name = f"usersvc-test-{uuid.uuid4().hex[:12]}"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        f"/var/lib/usersvc:uid={UID},gid={UID}",
        "--publish",
        "127.0.0.1::50051",
        "--volume",
        f"{keys}:/run/secrets/usersvc:ro",
        "--env",
        "USERSVC_ENVIRONMENT=production",
        "--env",
        f"USERSVC_SECRET_KEY={TEST_SECRET}",
        "--env",
        "USERSVC_DATABASE_URL=sqlite+aiosqlite:////var/lib/usersvc/usersvc.sqlite3",
        "--env",
        "USERSVC_JWT_SIGNING_KEY_FILE=/run/secrets/usersvc/jwt-signing-key.pem",
        "--env",
        f"USERSVC_SHUTDOWN_GRACE_SECONDS={GRACE_SECONDS}",
        "--env",
        "USERSVC_SHUTDOWN_DRAIN_SECONDS=1",
        image,
        "serve",
        "--migrate",
    )
    try:
        yield name
    finally:
        docker("rm", "--force", name, check=False)


def published(container: str) -> str:
    mapping = docker("port", container, "50051/tcp").splitlines()[0]
    return mapping.replace("0.0.0.0", "127.0.0.1")


def wait_serving(address: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(address) as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(
                        health_pb2.HealthCheckRequest(service="userservice.v1.UserService"),
                        timeout=2,
                    )
                    .status
                )
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the container never became SERVING")
        time.sleep(0.5)


def test_image_metadata(image: str) -> None:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "usersvc", "healthcheck"]
    assert "USERSVC_LISTEN_ADDRESS=0.0.0.0:50051" in config["Env"]
    # No build tools in the final image: no pip, no compiler.
    tools = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "ls /opt/usersvc/bin; command -v gcc cc pip pip3 || true",
    ).split()
    assert "usersvc" in tools
    assert not {"pip", "pip3", "gcc", "cc", "/usr/bin/gcc"} & set(tools)


def test_container_serves_health_and_authenticated_calls(container: str) -> None:
    address = published(container)
    wait_serving(address)
    with grpc.insecure_channel(address) as channel:
        overall = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
        token = docker("exec", container, "usersvc", "issue-service-token", "--subject", "probe")
        users = UserServiceStub(with_bearer(channel, token))
        email = f"container-{uuid.uuid4().hex[:8]}@example.com"
        created = users.CreateUser(
            pb.CreateUserRequest(email=email, name="In A Box", password="tangerine orbit 4711")
        ).user
        fetched = users.GetUser(pb.GetUserRequest(id=created.id)).user
        assert fetched.email == email
        with pytest.raises(grpc.RpcError) as err:
            UserServiceStub(channel).GetUser(pb.GetUserRequest(id=created.id))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_container_runs_as_non_root_on_a_read_only_root(container: str) -> None:
    assert docker("exec", container, "id", "-u") == UID
    state = json.loads(docker("inspect", container))[0]
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    write = subprocess.run(
        ["docker", "exec", container, "sh", "-c", "touch /opt/usersvc/x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_docker_healthcheck_reports_healthy(container: str) -> None:
    wait_serving(published(container))
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", container)
        if status == "healthy":
            break
        time.sleep(1)
    assert status == "healthy"


def test_docker_stop_exits_zero_within_the_grace(container: str) -> None:
    wait_serving(published(container))
    started = time.monotonic()
    docker("stop", "--time", str(GRACE_SECONDS + 20), container, timeout=60)
    elapsed = time.monotonic() - started
    state = json.loads(docker("inspect", container))[0]["State"]
    assert state["ExitCode"] == 0, docker("logs", container, check=False)
    assert state["OOMKilled"] is False
    assert elapsed < GRACE_SECONDS + 5
