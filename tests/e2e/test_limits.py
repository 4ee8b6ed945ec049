"""Connection and call limits: idle, half-open and excess connections and calls do not pile up."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support import ServerThread, ensure_admin, make_settings, mint_token, with_bearer
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.domain.errors import UserNotFound
from usersvc.services.users import UserService

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
GOAWAY = 0x7


@pytest.fixture(scope="module")
def limited(sqlite_url: str) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(
            sqlite_url,
            data_dir,
            handshake_timeout_seconds=1,
            max_connection_idle_seconds=1,
            max_concurrent_rpcs=2,
        )
        thread = ServerThread(settings).start()
        thread.admin_token = mint_token(ensure_admin(settings))  # type: ignore[attr-defined]
        yield thread
        thread.stop()


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(closed by the server within `seconds`, everything it sent)."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def _frame_types(data: bytes) -> list[int]:
    types, offset = [], 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        types.append(data[offset + 3])
        offset += 9 + length
    return types


def test_a_connection_that_never_sends_the_preface_is_closed(limited: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        closed, _ = _closed_within(sock, 5)
    assert closed


def test_an_idle_http2_connection_gets_goaway(limited: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", limited.port)) as sock:
        sock.sendall(HTTP2_PREFACE + EMPTY_SETTINGS_FRAME)
        # The server may wait for the client to close after GOAWAY; seeing GOAWAY is enough.
        deadline = time.monotonic() + 6
        received = b""
        while GOAWAY not in _frame_types(received) and time.monotonic() < deadline:
            closed, more = _closed_within(sock, 0.5)
            received += more
            if closed:
                break
    assert GOAWAY in _frame_types(received)


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(
    limited: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(self: UserService, user_id: str, **_: object) -> None:
        await asyncio.sleep(2)
        raise UserNotFound(user_id)

    monkeypatch.setattr(UserService, "get_user", slow)

    def call() -> tuple[grpc.StatusCode, float]:
        started = time.monotonic()
        with grpc.insecure_channel(limited.address) as channel:
            stub = UserServiceStub(with_bearer(channel, limited.admin_token))  # type: ignore[attr-defined]
            try:
                stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), timeout=10)
            except grpc.RpcError as err:
                return err.code(), time.monotonic() - started
        return grpc.StatusCode.OK, time.monotonic() - started

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: call(), range(6)))
    refused = [elapsed for code, elapsed in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) >= 3, results
    # The admitted calls reached the (slow) use case: authentication passed.
    codes = {code for code, _ in results}
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}, results
    # Refused at once, not after waiting for a slot.
    assert max(refused) < 1.5, results
