"""Opaque, tamper-proof resume tokens of the change feed: position and time under an HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from datetime import UTC, datetime, timedelta

from usersvc.domain.errors import InvalidResumeToken

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAYOUT = struct.Struct(">BQq")  # version, position, microseconds since the epoch
_VERSION = 1
_MAC_BYTES = 16
MAX_TOKEN_CHARS = 1024


class ResumeTokenCodec:
    """Every replica with the same secret reads every other replica's tokens."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"usersvc resume tokens v1\0" + secret).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, position: int, time: datetime) -> str:
        micros = (time - _EPOCH) // timedelta(microseconds=1)
        body = _LAYOUT.pack(_VERSION, position, micros)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def decode(self, token: str) -> tuple[int, datetime]:
        """(position, time); InvalidResumeToken for garbage or tampering."""
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise InvalidResumeToken("resume token is invalid")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError as err:
            raise InvalidResumeToken("resume token is invalid") from err
        body, mac = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        if len(raw) != _LAYOUT.size + _MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidResumeToken("resume token is invalid")
        version, position, micros = _LAYOUT.unpack(body)
        if version != _VERSION:
            raise InvalidResumeToken("resume token is invalid")
        try:
            return position, _EPOCH + timedelta(microseconds=micros)
        except OverflowError as err:
            raise InvalidResumeToken("resume token is invalid") from err
