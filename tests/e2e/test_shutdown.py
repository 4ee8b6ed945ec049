"""After SIGTERM, calls that reach the server are refused with UNAVAILABLE and RetryInfo."""

from __future__ import annotations

import tempfile
import threading
from collections import Counter

import grpc

from tests.processes import ServerProcess, server_env
from tests.support import details_of
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub

CLIENTS = 4


def test_calls_during_shutdown_are_refused_with_unavailable(sqlite_url: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        env = server_env(sqlite_url, data_dir, USERSVC_SHUTDOWN_GRACE_SECONDS="5")
        server = ServerProcess(env)
        codes: Counter[grpc.StatusCode] = Counter()
        reasons: Counter[str] = Counter()
        stop = threading.Event()

        def load() -> None:
            with grpc.insecure_channel(server.address) as channel:
                stub = AuthServiceStub(channel)
                while not stop.is_set():
                    try:
                        stub.GetJwks(auth_pb.GetJwksRequest(), timeout=5)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as err:
                        code = err.code()
                        if code == grpc.StatusCode.UNAVAILABLE and err.trailing_metadata():
                            details = details_of(err)
                            assert details.retry_delay_seconds
                            reasons[details.reason] += 1
                    codes[code] += 1
                    # A client that honours RetryInfo waits before calling again.
                    stop.wait(0.01 if code == grpc.StatusCode.OK else 0.2)

        threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            while codes[grpc.StatusCode.OK] < 100:
                stop.wait(0.05)
            assert server.terminate() == 0
            stop.wait(0.5)  # and a few calls against the closed port
        finally:
            stop.set()
            for t in threads:
                t.join()
            server.kill()
    # Calls that reached the server after SIGTERM got UNAVAILABLE, SHUTTING_DOWN.
    assert reasons["SHUTTING_DOWN"] > 0, (codes, reasons)
    # grpc core itself cancels a call that it had accepted but not yet handed to the
    # application at the instant the server stops: at most one per client here.
    assert set(codes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    assert codes[grpc.StatusCode.CANCELLED] <= CLIENTS, codes
