"""Opaque page tokens: the keyset cursor, encrypted and authenticated (Fernet)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from usersvc.domain.errors import InvalidPageToken
from usersvc.domain.models import PageCursor

__all__ = ["InvalidPageToken", "PageTokenCodec"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageTokenCodec:
    """Encodes a cursor bound to the query it came from; nothing in it is readable."""

    def __init__(self, secret: bytes, *, max_age_seconds: int = 7 * 24 * 3600) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"usersvc page tokens v1"
        ).derive(secret)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self._max_age = max_age_seconds

    @staticmethod
    def _fingerprint(query: str) -> str:
        return hashlib.sha256(query.encode()).hexdigest()[:16]

    def encode(self, cursor: PageCursor, *, query: str) -> str:
        micros = (cursor.create_time - _EPOCH) // timedelta(microseconds=1)
        payload = {"t": micros, "i": cursor.id.hex, "q": self._fingerprint(query)}
        return self._fernet.encrypt(json.dumps(payload, separators=(",", ":")).encode()).decode()

    def decode(self, token: str, *, query: str) -> PageCursor:
        try:
            raw = self._fernet.decrypt(token.encode(), ttl=self._max_age)
            payload = json.loads(raw)
            if payload["q"] != self._fingerprint(query):
                raise InvalidPageToken("page token belongs to another query")
            created = _EPOCH + timedelta(microseconds=int(payload["t"]))
            return PageCursor(create_time=created, id=uuid.UUID(hex=payload["i"]))
        except InvalidPageToken:
            raise
        except (InvalidToken, ValueError, KeyError, TypeError, UnicodeError) as err:
            raise InvalidPageToken("page token is invalid") from err
