"""TLS and mutual TLS: calls over both, refusals, certificate reload on file change, and
`usersvc healthcheck` against live, stopped and TLS servers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certificates import CertificateAuthority, Issued, peer_certificate_serial
from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    ensure_admin,
    login,
    make_settings,
    with_bearer,
)
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub

ROOT = Path(__file__).resolve().parents[2]
READY = "userservice.v1.UserService"


@dataclass
class Pki:
    directory: Path
    ca: CertificateAuthority
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ca = CertificateAuthority(directory)
        other = CertificateAuthority(directory, name="another CA")
        yield Pki(
            directory,
            ca,
            ca.issue("localhost", server=True, stem="server"),
            ca.issue("billing", server=False),
            other.issue("mallory", server=False),
        )


def channel_to(address: str, ca: bytes | None, client: Issued | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def health(channel: grpc.Channel) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=READY), timeout=5
    )
    return int(response.status)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        health(channel)
    code = err.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


@pytest.fixture(scope="module")
def tls_server(sqlite_url: str, pki: Pki) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        # Copies, so that the reload test can rewrite them.
        cert, key = Path(data_dir, "tls.crt"), Path(data_dir, "tls.key")
        cert.write_bytes(pki.server.cert_pem)
        key.write_bytes(pki.server.key_pem)
        settings = make_settings(sqlite_url, data_dir, tls_cert_file=cert, tls_key_file=key)
        ensure_admin(settings, ADMIN_EMAIL)
        thread = ServerThread(settings).start()
        yield thread
        thread.stop()


@pytest.fixture(scope="module")
def mtls_server(sqlite_url: str, pki: Pki) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(
            sqlite_url,
            data_dir,
            tls_cert_file=pki.server.cert_file,
            tls_key_file=pki.server.key_file,
            tls_client_ca_file=pki.ca.cert_file,
        )
        thread = ServerThread(settings).start()
        yield thread
        thread.stop()


def test_calls_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    with channel_to(tls_server.address, pki.ca.cert_pem) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
        listed = UserServiceStub(with_bearer(channel, token)).ListUsers(
            pb.ListUsersRequest(page_size=1)
        )
        assert listed.users


def test_tls_server_refuses_plaintext_and_untrusted_clients(
    tls_server: ServerThread, pki: Pki
) -> None:
    with grpc.insecure_channel(tls_server.address) as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA (the system roots) refuses the server.
    with channel_to(tls_server.address, None) as untrusting:
        assert refused(untrusting) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with channel_to(mtls_server.address, pki.ca.cert_pem, pki.client) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    with channel_to(mtls_server.address, pki.ca.cert_pem) as no_certificate:
        assert refused(no_certificate) == grpc.StatusCode.UNAVAILABLE
    with channel_to(mtls_server.address, pki.ca.cert_pem, pki.stranger) as stranger:
        assert refused(stranger) == grpc.StatusCode.UNAVAILABLE


def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    tls_server: ServerThread, pki: Pki
) -> None:
    settings = tls_server.settings
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    before = peer_certificate_serial(tls_server.address, pki.ca.cert_pem)
    assert before == pki.server.serial
    rotated = pki.ca.issue("localhost", server=True, stem="rotated")

    # Mid-rotation: the new key is in place, the certificate not yet. The old pair stays.
    settings.tls_key_file.write_bytes(rotated.key_pem)
    time.sleep(0.01)
    assert peer_certificate_serial(tls_server.address, pki.ca.cert_pem) == before
    with channel_to(tls_server.address, pki.ca.cert_pem) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING

    settings.tls_cert_file.write_bytes(rotated.cert_pem)
    assert peer_certificate_serial(tls_server.address, pki.ca.cert_pem) == rotated.serial
    with channel_to(tls_server.address, pki.ca.cert_pem) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_key_that_does_not_match_the_certificate_fails_start_up(
    sqlite_url: str, pki: Pki, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_url,
        str(tmp_path),
        tls_cert_file=pki.server.cert_file,
        tls_key_file=pki.client.key_file,
    )
    with pytest.raises(ValueError, match="does not belong"):
        ServerThread(settings).start()


# --- usersvc healthcheck -------------------------------------------------------------------


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "usersvc", "healthcheck", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_healthcheck_against_a_live_and_a_stopped_server(sqlite_url: str, tmp_path: Path) -> None:
    thread = ServerThread(make_settings(sqlite_url, str(tmp_path))).start()
    address = thread.address
    try:
        live = healthcheck("--address", address, "--service", READY, "-v")
        assert live.returncode == 0, live.stderr
        assert "SERVING" in live.stdout
        # The address from the settings, a wildcard host probed on loopback.
        from_settings = healthcheck(env={"USERSVC_LISTEN_ADDRESS": f"0.0.0.0:{thread.port}"})
        assert from_settings.returncode == 0, from_settings.stderr
        unknown = healthcheck("--address", address, "--service", "no.such.Service")
        assert unknown.returncode == 1
        assert "NOT_FOUND" in unknown.stderr
    finally:
        thread.stop()
    stopped = healthcheck("--address", address, "--timeout", "2")
    assert stopped.returncode == 1
    assert "UNAVAILABLE" in stopped.stderr


def test_healthcheck_over_tls_and_mutual_tls(
    tls_server: ServerThread, mtls_server: ServerThread, pki: Pki
) -> None:
    ca = str(pki.ca.cert_file)
    tls = ("--tls", "--ca-file", ca, "--server-name", "localhost")
    assert healthcheck("--address", tls_server.address, *tls).returncode == 0
    assert healthcheck("--address", tls_server.address, "--timeout", "2").returncode == 1
    client = ("--cert-file", str(pki.client.cert_file), "--key-file", str(pki.client.key_file))
    ok = healthcheck("--address", mtls_server.address, *tls, *client)
    assert ok.returncode == 0, ok.stderr
    assert healthcheck("--address", mtls_server.address, *tls, "--timeout", "2").returncode == 1
    # TLS on by default when the server's settings say so.
    env = {
        "USERSVC_LISTEN_ADDRESS": tls_server.address,
        "USERSVC_TLS_CERT_FILE": str(pki.server.cert_file),
        "USERSVC_TLS_KEY_FILE": str(pki.server.key_file),
    }
    assert healthcheck("--ca-file", ca, "--server-name", "localhost", env=env).returncode == 0
