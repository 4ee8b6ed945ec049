"""Prometheus metrics: a real `usersvc serve` (one and two workers) scraped after known calls,
and the service-level metrics of an in-process server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support import TEST_SECRET, TEST_SIGNING_KEY, ServerThread, make_settings
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.metrics import MULTIPROCESS_ENV
from usersvc.operator_tasks import create_admin

ROOT = Path(__file__).resolve().parents[2]
AUTH = "userservice.v1.AuthService"
USERS = "userservice.v1.UserService"
HEALTH = "grpc.health.v1.Health"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    log_path: Path
    address: str
    metrics_url: str

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
def serve_with_metrics(request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    workers: int = request.param
    with tempfile.TemporaryDirectory() as data_dir:
        env = {
            **os.environ,
            "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0",
            "USERSVC_METRICS_ADDRESS": "127.0.0.1:0",
            "USERSVC_DATA_DIR": data_dir,
            "USERSVC_WORKERS": str(workers),
            "USERSVC_SECRET_KEY": TEST_SECRET,
            "USERSVC_JWT_SIGNING_KEY_FILE": str(TEST_SIGNING_KEY),
        }
        env.pop("USERSVC_DATABASE_URL", None)
        env.pop(MULTIPROCESS_ENV, None)
        log_path = Path(data_dir) / "serve.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "usersvc", "serve", "--migrate"],
                env=env,
                stderr=log_file,
                text=True,
                cwd=ROOT,
            )
        try:
            deadline = time.monotonic() + 60
            address = metrics = ""
            while time.monotonic() < deadline:
                time.sleep(0.1)
                lines = [json.loads(x) for x in log_path.read_text().splitlines() if x]
                serving = [x for x in lines if x["message"] == "serving"]
                listening = [x for x in lines if x["message"] == "metrics endpoint listening"]
                if len(serving) == workers and listening:
                    address, metrics = str(serving[0]["address"]), str(listening[0]["address"])
                    break
            assert address and metrics, log_path.read_text()
            assert MULTIPROCESS_ENV not in os.environ
            yield ServeProcess(proc, log_path, address, f"http://{metrics}/metrics")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_one_scrape_counts_every_call_of_every_worker_by_code(
    serve_with_metrics: ServeProcess,
) -> None:
    server = serve_with_metrics
    serving = [x for x in server.log_lines() if x["message"] == "serving"]
    # Each worker runs on uvloop, the default where it is installed (a dependency here).
    assert {x["event_loop"] for x in serving} == {"uvloop"}
    workers = {int(str(x["pid"])) for x in serving}
    calls: Counter[tuple[str, str, str]] = Counter()
    served_by: set[int] = set()
    n = 0
    # A new connection per call: the kernel spreads connections over the workers. Go on until
    # every worker answered some calls (the access log says which), at least 24 calls.
    while n < 24 or (served_by != workers and n < 200):
        n += 1
        with grpc.insecure_channel(server.address) as channel:
            kind = n % 4
            if kind == 0:
                AuthServiceStub(channel).GetJwks(auth_pb.GetJwksRequest())
                calls[(AUTH, "GetJwks", "OK")] += 1
            elif kind == 1:
                with pytest.raises(grpc.RpcError) as err:
                    UserServiceStub(channel).GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                calls[(USERS, "GetUser", "UNAUTHENTICATED")] += 1
            elif kind == 2:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                calls[(HEALTH, "Check", "OK")] += 1
            else:
                with pytest.raises(grpc.RpcError) as err:
                    health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="no.such.Service")
                    )
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                calls[(HEALTH, "Check", "NOT_FOUND")] += 1
        if kind in (0, 1):
            time.sleep(0.05)  # let the access line reach the file
            served_by = {int(str(x["pid"])) for x in server.log_lines() if x["message"] == "rpc"}
    assert served_by == workers, f"calls reached only {served_by} of {workers}"

    samples = scrape(server.metrics_url)
    for (service, method, code), count in calls.items():
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
        assert value(samples, "grpc_server_handled_total", **labels, grpc_code=code) == count
    for service, method in {(s, m) for s, m, _ in calls}:
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
        total = sum(c for (s, m, _), c in calls.items() if (s, m) == (service, method))
        assert value(samples, "grpc_server_started_total", **labels) == total
        assert value(samples, "grpc_server_handling_seconds_count", **labels) == total
        assert value(samples, "grpc_server_handling_seconds_bucket", **labels, le="+Inf") == total
    # No code was counted that did not happen.
    counted = {
        dict(labels)["grpc_code"]
        for (name, labels), v in samples.items()
        if name == "grpc_server_handled_total" and v
    }
    assert counted == {code for _, _, code in calls}
    # The pool gauges of every worker are summed; each worker keeps pool_size (10) primary.
    workers_count = len(workers)
    assert value(samples, "usersvc_db_pool_size", pool="primary") == 10 * workers_count
    assert value(samples, "usersvc_outbox_messages", state="pending") == 0
    assert value(samples, "usersvc_password_hash_queue_depth") == 0


@pytest.fixture
def login_server(sqlite_url: str) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(sqlite_url, data_dir, login_max_failures=2)
        thread = ServerThread(settings).start()
        yield thread
        thread.stop()


def test_login_failures_and_lockouts_are_counted(login_server: ServerThread) -> None:
    assert login_server.running is not None
    metrics = login_server.running.metrics
    email = f"locked-{uuid.uuid4().hex[:8]}@example.com"

    async def admin() -> None:
        assert login_server.running is not None
        await create_admin(
            login_server.running.components, email=email, name="Lock", password="right password 1"
        )

    login_server.call(admin())

    def sample(name: str, **labels: str) -> float:
        found = metrics.registry.get_sample_value(name, labels)
        return found or 0.0

    before = {
        reason: sample("usersvc_login_failures_total", reason=reason)
        for reason in ("wrong_password", "locked", "unknown_email")
    }
    lockouts = sample("usersvc_login_lockouts_total")
    with grpc.insecure_channel(login_server.address) as channel:
        stub = AuthServiceStub(channel)
        attempts = [
            (email, "wrong one 1"),
            (email, "wrong one 2"),  # the second failure locks (login_max_failures=2)
            (email, "right password 1"),  # refused: locked
            ("nobody-" + email, "whatever 1"),
        ]
        for address, password in attempts:
            with pytest.raises(grpc.RpcError) as err:
                stub.Login(auth_pb.LoginRequest(email=address, password=password))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sample("usersvc_login_failures_total", reason="wrong_password") == (
        before["wrong_password"] + 2
    )
    assert sample("usersvc_login_failures_total", reason="locked") == before["locked"] + 1
    assert sample("usersvc_login_failures_total", reason="unknown_email") == (
        before["unknown_email"] + 1
    )
    assert sample("usersvc_login_lockouts_total") == lockouts + 1


def test_a_taken_metrics_address_fails_start_up_clearly(sqlite_url: str, tmp_path: Path) -> None:
    import socket

    from usersvc.server import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = make_settings(sqlite_url, str(tmp_path), metrics_address=address)
        with pytest.raises(OSError, match=f"could not serve metrics on {address}"):
            asyncio.run(serve(settings))
