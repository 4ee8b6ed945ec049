"""The README's WatchUserEvents consumer, run as written: it follows changes across a server
restart and its own restart, each change printed once."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.auth_helpers import PASSWORD, unique_email
from tests.smtp_server import free_port
from tests.support import ADMIN_PASSWORD, ServerThread, ensure_admin, login, make_settings
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Following changes (WatchUserEvents)"


def consumer_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```python\n(.*?)^```$", text[start:end], re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1
    return str(blocks[0])


class Consumer:
    """The example in a process of its own; its output lines as they come."""

    def __init__(self, address: str, cwd: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", consumer_example()],
            cwd=cwd,
            env={"ADDR": address, "USERSVC_PASSWORD": ADMIN_PASSWORD, "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never printed; output: {self.lines[-10:]}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server_settings(sqlite_url: str) -> Iterator[tuple[str, Settings]]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir, listen_address=f"127.0.0.1:{free_port()}")
        ensure_admin(settings)
        yield data_dir, settings


def _create(address: str, email: str) -> None:
    with grpc.insecure_channel(address) as channel:
        token = login(channel, "admin@example.com", ADMIN_PASSWORD).access_token
        UserServiceStub(channel).CreateUser(
            pb.CreateUserRequest(email=email, name="Followed", password=PASSWORD),
            metadata=(("authorization", f"Bearer {token}"),),
        )


def test_the_readme_consumer_resumes_after_any_disconnect(
    server_settings: tuple[str, Settings],
) -> None:
    _, settings = server_settings
    server = ServerThread(settings).start()
    address = server.address
    with tempfile.TemporaryDirectory() as cwd:
        consumer = Consumer(address, cwd)
        try:
            state = Path(cwd) / "users.resume-token"
            deadline = time.monotonic() + 15
            while not state.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # the first checkpoint is saved: it follows from here
            first, second, third = (unique_email("readme") for _ in range(3))
            _create(address, first)
            consumer.wait_for(first)
            # The server restarts: the stream ends, the consumer resumes from its token.
            server.stop(grace=5)
            server = ServerThread(settings).start()
            _create(address, second)
            consumer.wait_for(second, timeout=20)
            time.sleep(0.5)
            before = consumer.lines
            assert [line for line in before if first in line or second in line] == [
                f"USER_EVENT_TYPE_CREATED {first}",
                f"USER_EVENT_TYPE_CREATED {second}",
            ]
            # The consumer restarts: it resumes from the token it saved.
            consumer.stop()
            consumer = Consumer(address, cwd)
            _create(address, third)
            consumer.wait_for(third, timeout=20)
            time.sleep(0.5)
            printed = consumer.lines
            assert [line for line in printed if first in line or second in line] == []
            assert [line for line in printed if third in line] == [
                f"USER_EVENT_TYPE_CREATED {third}"
            ]
        finally:
            consumer.stop()
            server.stop()
