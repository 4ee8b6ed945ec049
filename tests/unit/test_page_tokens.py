"""PageTokenCodec: opaque, authenticated page tokens bound to one query."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from cryptography import fernet

from usersvc.adapters.page_tokens import InvalidPageToken, PageTokenCodec
from usersvc.domain.models import PageCursor

SECRET = b"unit-test-secret-for-page-tokens-0123456789"
QUERY = "email="


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(SECRET)


@pytest.fixture
def cursor() -> PageCursor:
    return PageCursor(
        create_time=datetime(2031, 5, 17, 8, 30, 12, 345678, tzinfo=UTC), id=uuid.uuid4()
    )


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token.encode())


@pytest.mark.parametrize(
    "create_time",
    [
        datetime(2031, 5, 17, 8, 30, 12, 345678, tzinfo=UTC),
        datetime(1960, 1, 1, 0, 0, 0, 1, tzinfo=UTC),  # before the epoch
        datetime(2300, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2031, 5, 17, 14, 0, 0, 7, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    ],
)
def test_round_trip_gives_back_the_cursor(codec: PageTokenCodec, create_time: datetime) -> None:
    original = PageCursor(create_time=create_time, id=uuid.uuid4())
    decoded = codec.decode(codec.encode(original, query=QUERY), query=QUERY)
    assert decoded == original
    assert decoded.create_time.utcoffset() == timedelta(0)


def test_another_codec_with_the_same_secret_reads_the_token(
    codec: PageTokenCodec, cursor: PageCursor
) -> None:
    token = codec.encode(cursor, query=QUERY)
    assert PageTokenCodec(SECRET).decode(token, query=QUERY) == cursor


def test_token_is_not_readable(codec: PageTokenCodec, cursor: PageCursor) -> None:
    token = codec.encode(cursor, query="email=alice@example.com")
    raw = _raw(token)
    for needle in (cursor.id.hex, str(cursor.id), "alice", '"t"', '"i"', "2031"):
        assert needle.encode() not in raw
        assert needle.lower() not in token.lower()
    with pytest.raises((ValueError, UnicodeDecodeError)):
        json.loads(raw)


@pytest.mark.parametrize("position", [0, 1, 8, 9, 24, 25, "middle", -33, -32, -1])
def test_token_altered_by_one_byte_is_refused(
    codec: PageTokenCodec, cursor: PageCursor, position: int | str
) -> None:
    raw = bytearray(_raw(codec.encode(cursor, query=QUERY)))
    index = len(raw) // 2 if position == "middle" else int(position)
    raw[index] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(InvalidPageToken):
        codec.decode(tampered, query=QUERY)


@pytest.mark.parametrize("index", [0, 5, 20, 40, -8])
def test_token_with_one_character_replaced_is_refused(
    codec: PageTokenCodec, cursor: PageCursor, index: int
) -> None:
    token = codec.encode(cursor, query=QUERY)
    replacement = "B" if token[index] == "A" else "A"
    position = index % len(token)
    tampered = token[:position] + replacement + token[position + 1 :]
    assert tampered != token
    with pytest.raises(InvalidPageToken):
        codec.decode(tampered, query=QUERY)


def test_token_from_another_query_is_refused(codec: PageTokenCodec, cursor: PageCursor) -> None:
    token = codec.encode(cursor, query="email=")
    with pytest.raises(InvalidPageToken, match="another query"):
        codec.decode(token, query="email=alice@example.com")


def test_token_made_with_another_secret_is_refused(cursor: PageCursor) -> None:
    token = PageTokenCodec(b"some-other-secret").encode(cursor, query=QUERY)
    with pytest.raises(InvalidPageToken):
        PageTokenCodec(SECRET).decode(token, query=QUERY)


def _readable_token() -> str:
    payload = {"t": 0, "i": uuid.uuid4().hex, "q": "0" * 16}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "garbage",
        "!!!!",
        "====",
        "ünïcödé",
        "A" * 120,
        base64.urlsafe_b64encode(b"\x80" + b"\x00" * 72).decode(),  # right version byte only
        _readable_token(),  # a forged, readable cursor
        fernet.Fernet(fernet.Fernet.generate_key()).encrypt(b'{"t":0,"i":"00","q":"x"}').decode(),
    ],
)
def test_garbage_is_refused(codec: PageTokenCodec, garbage: str) -> None:
    with pytest.raises(InvalidPageToken):
        codec.decode(garbage, query=QUERY)


def test_truncated_or_extended_token_is_refused(codec: PageTokenCodec, cursor: PageCursor) -> None:
    token = codec.encode(cursor, query=QUERY)
    raw = _raw(token)
    for altered in (raw[:-1], raw[:-16], raw + b"\x00", raw[:57]):
        with pytest.raises(InvalidPageToken):
            codec.decode(base64.urlsafe_b64encode(altered).decode(), query=QUERY)


def _encode_at(
    monkeypatch: pytest.MonkeyPatch, codec: PageTokenCodec, cursor: PageCursor, at: float
) -> str:
    with monkeypatch.context() as patch:
        patch.setattr(fernet, "time", SimpleNamespace(time=lambda: at))
        return codec.encode(cursor, query=QUERY)


def test_token_older_than_max_age_is_refused(
    monkeypatch: pytest.MonkeyPatch, cursor: PageCursor
) -> None:
    codec = PageTokenCodec(SECRET, max_age_seconds=3600)
    now = datetime.now(UTC).timestamp()
    fresh = _encode_at(monkeypatch, codec, cursor, now - 60)
    stale = _encode_at(monkeypatch, codec, cursor, now - 7200)
    assert codec.decode(fresh, query=QUERY) == cursor
    with pytest.raises(InvalidPageToken):
        codec.decode(stale, query=QUERY)
