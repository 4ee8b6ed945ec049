"""Server TLS and mutual TLS from files that are read again when they change.

gRPC asks `ReloadingCertificates.fetch` for a new certificate configuration at every new
connection's handshake; it answers None (keep the current one) unless one of the files' size
or modification time changed, in which case it reads them again. So a rotated certificate
(cert-manager rewriting a mounted Secret, say) is used from the next connection on, without a
restart or signal; connections already open keep theirs. A pair that does not match (the key
written before the certificate) is refused and the previous pair kept until both are in place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from usersvc.config import Settings

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int], ...]


class CertificateMismatch(ValueError):
    pass


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    certificate = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise CertificateMismatch("the TLS key does not belong to the TLS certificate")


class ReloadingCertificates:
    """The server's certificate, key and (for mutual TLS) client CA, reloaded on change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._files = [cert_file, key_file] + ([client_ca_file] if client_ca_file else [])
        self._require_client_cert = client_ca_file is not None
        self._stamp = self._current_stamp()
        # Read at start-up: an unreadable or mismatched pair fails start-up, clearly.
        self._config = self._read()

    def _current_stamp(self) -> Stamp:
        stamps = []
        for path in self._files:
            info = os.stat(path)
            stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem = self._files[0].read_bytes(), self._files[1].read_bytes()
        _check_pair(cert_pem, key_pem)
        client_ca = self._files[2].read_bytes() if self._require_client_cert else None
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration, or None for no change."""
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return None
            config = self._read()
        except (OSError, ValueError) as err:
            # Mid-rotation (one file written, the other not yet): keep serving the old pair.
            log.warning("TLS files changed but cannot be used yet: %s", err)
            return None
        self._stamp = stamp
        self._config = config
        log.info("TLS certificates reloaded")
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config,
            self.fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"
            require_client_authentication=self._require_client_cert,
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    return ReloadingCertificates(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    ).credentials()
