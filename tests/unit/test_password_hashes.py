"""Imported password hash formats: parsing, bounds, verification and re-hashing."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.password_hash_samples import FORMATS, bcrypt_hash, django_pbkdf2, passlib_pbkdf2
from usersvc.adapters.password_hasher import Argon2PasswordHasher
from usersvc.domain.models import SERVICE_ACCOUNT_PASSWORD_HASH
from usersvc.domain.password_hashes import (
    ARGON2_MAX_MEMORY_KIB,
    HashFormatError,
    HashScheme,
    parse_password_hash,
)

PASSWORD = "ünïcode pass phrase 42"
PARAMS: dict[str, Any] = {"time_cost": 2, "memory_kib": 19456, "parallelism": 1}
SALT = base64.b64encode(b"saltsalt").decode().rstrip("=")
DIGEST = base64.b64encode(b"h" * 32).decode().rstrip("=")


def argon2_text(m: int = 65536, t: int = 3, p: int = 4, v: int = 19, kind: str = "id") -> str:
    return f"$argon2{kind}$v={v}$m={m},t={t},p={p}${SALT}${DIGEST}"


@pytest.mark.parametrize(
    ("text", "scheme", "variant"),
    [
        (argon2_text(), HashScheme.ARGON2, "argon2id"),
        (argon2_text(kind="i"), HashScheme.ARGON2, "argon2i"),
        (argon2_text(kind="d"), HashScheme.ARGON2, "argon2d"),
        (argon2_text(m=ARGON2_MAX_MEMORY_KIB, t=20, p=16), HashScheme.ARGON2, "argon2id"),
        ("$2a$04$" + "a" * 53, HashScheme.BCRYPT, ""),
        ("$2b$16$" + "./" * 26 + "A", HashScheme.BCRYPT, ""),
        ("$2y$10$" + "Z" * 53, HashScheme.BCRYPT, ""),
    ],
)
def test_accepted_formats_are_recognised(text: str, scheme: HashScheme, variant: str) -> None:
    parsed = parse_password_hash(text)
    assert (parsed.scheme, parsed.variant) == (scheme, variant)


def test_pbkdf2_encodings_yield_their_parts() -> None:
    passlib = parse_password_hash("$pbkdf2-sha256$29000$c2FsdC5zYWx0$" + "a.b" * 14 + "c")
    assert passlib.scheme is HashScheme.PBKDF2_SHA256
    assert (passlib.iterations, passlib.salt) == (29000, b"salt.salt")
    assert len(passlib.digest) == 32
    django = parse_password_hash(
        "pbkdf2_sha256$870000$AbCdEfGh12$" + base64.b64encode(b"d" * 32).decode()
    )
    assert django.scheme is HashScheme.DJANGO_PBKDF2_SHA256
    assert (django.iterations, django.salt, django.digest) == (870000, b"AbCdEfGh12", b"d" * 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("x" * 1025, "at most 1024"),
        ("plain text", "unknown password hash format"),
        ("$1$saltsalt$hash", "unknown password hash format"),
        ("$6$rounds=5000$salt$hash", "unknown password hash format"),
        ("{SSHA}abc", "unknown password hash format"),
        ("sha1$salt$hash", "unknown password hash format"),
        (argon2_text(v=16), "version 19"),
        (argon2_text(m=ARGON2_MAX_MEMORY_KIB + 1), "argon2 memory"),
        (argon2_text(m=31, p=4), "argon2 memory"),
        (argon2_text(t=0), "argon2 time cost"),
        (argon2_text(t=21), "argon2 time cost"),
        (argon2_text(p=0), "argon2 parallelism"),
        (argon2_text(p=17, m=65536), "argon2 parallelism"),
        (f"$argon2id$v=19$m=65536,t=3,p=4${SALT}", "malformed argon2 hash"),
        (f"$argon2id$v=19$m=65536,t=3,p=4$c2FsdA${DIGEST}", "salt must be at least 8"),
        (f"$argon2id$v=19$m=65536,t=3,p=4${SALT}$aGFzaA", "hash at least 16"),
        (f"$argon2id$v=19$m=65536,t=3,p=4${SALT}$a", "not valid base64"),
        ("$argon2x$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA", "malformed argon2 hash"),
        ("$2b$03$" + "a" * 53, "bcrypt cost must be 4 to 16"),
        ("$2b$17$" + "a" * 53, "bcrypt cost must be 4 to 16"),
        ("$2b$31$" + "a" * 53, "bcrypt cost must be 4 to 16"),
        ("$2b$12$" + "a" * 52, "malformed bcrypt hash"),
        ("$2b$12$" + "a" * 52 + "!", "malformed bcrypt hash"),
        ("$2c$12$" + "a" * 53, "malformed bcrypt hash"),
        ("$pbkdf2-sha256$999$c2FsdHNhbHQ$" + "a" * 43, "iterations must be 1,000 to 10,000,000"),
        ("$pbkdf2-sha256$10000001$c2FsdHNhbHQ$" + "a" * 43, "iterations must be"),
        ("$pbkdf2-sha256$29000$c2FsdA$" + "a" * 43, "salt must be at least 8"),
        ("$pbkdf2-sha256$29000$c2FsdHNhbHQ$" + "a" * 45, "not valid base64"),
        ("$pbkdf2-sha256$29000$c2FsdHNhbHQ$" + "a" * 44, "16 to 32 bytes"),
        ("$pbkdf2-sha256$29000$c2FsdHNhbHQ$" + "a" * 64, "16 to 32 bytes"),
        ("$pbkdf2-sha256$29000$c2FsdHNhbHQ$aGFzaA", "16 to 32 bytes"),
        ("$pbkdf2-sha256$29000$c2FsdHNhbHQ", "malformed pbkdf2-sha256 hash"),
        ("$pbkdf2-sha512$29000$c2FsdHNhbHQ$" + "a" * 43, "unknown password hash format"),
        ("pbkdf2_sha256$999$saltsalt$" + "a" * 43 + "=", "iterations must be"),
        ("pbkdf2_sha256$600000$salt$" + "a" * 43 + "=", "salt must be at least 8"),
        ("pbkdf2_sha256$600000$saltsalt$a*b", "malformed pbkdf2_sha256 hash"),
        ("pbkdf2_sha1$600000$saltsalt$" + "a" * 27 + "=", "unknown password hash format"),
    ],
)
def test_other_formats_and_absurd_parameters_are_refused(text: str, message: str) -> None:
    with pytest.raises(HashFormatError) as caught:
        parse_password_hash(text)
    assert message in str(caught.value)
    # The description names the rule, never the hash.
    if len(text) >= 8:
        assert text not in str(caught.value)


@pytest.fixture
async def hasher() -> Any:
    made = Argon2PasswordHasher(**PARAMS, concurrency=1)
    try:
        yield made
    finally:
        made.close()


@pytest.mark.parametrize("name", sorted(FORMATS))
async def test_each_format_verifies_its_password_and_needs_a_rehash(
    name: str, hasher: Argon2PasswordHasher
) -> None:
    imported = FORMATS[name](PASSWORD)
    assert hasher.allows_password_login(imported)
    assert await hasher.verify(imported, PASSWORD)
    assert not await hasher.verify(imported, PASSWORD + "!")
    assert not await hasher.verify(imported, "")
    assert hasher.needs_rehash(imported)
    current = await hasher.hash(PASSWORD)
    assert current.startswith("$argon2id$")
    assert not hasher.needs_rehash(current)


async def test_hashes_that_cannot_verify_refuse_every_password(
    hasher: Argon2PasswordHasher,
) -> None:
    too_costly = "$2b$17$" + "a" * 53
    for stored in (SERVICE_ACCOUNT_PASSWORD_HASH, "$md5$nope", too_costly, ""):
        assert not hasher.allows_password_login(stored)
        assert not await hasher.verify(stored, PASSWORD)


async def test_bcrypt_reads_the_first_72_bytes_as_the_systems_that_made_it_did(
    hasher: Argon2PasswordHasher,
) -> None:
    long_password = "x" * 72 + "tail"
    imported = bcrypt_hash("x" * 72)
    # bcrypt itself ignores what follows 72 bytes; the hash was made from the same prefix.
    assert await hasher.verify(imported, long_password)
    assert not await hasher.verify(imported, "x" * 71)


async def test_pbkdf2_with_another_salt_or_iteration_count_does_not_verify(
    hasher: Argon2PasswordHasher,
) -> None:
    for make in (passlib_pbkdf2, django_pbkdf2):
        imported = make(PASSWORD, 1000)
        tampered = imported.replace("$1000$", "$1001$", 1)
        assert tampered != imported
        assert await hasher.verify(imported, PASSWORD)
        assert not await hasher.verify(tampered, PASSWORD)
