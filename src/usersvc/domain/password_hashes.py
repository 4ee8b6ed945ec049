"""Password hash formats: which encodings an import may bring, and the bounds on their cost.

Parsing only; verifying is the password hasher adapter's work (argon2-cffi, bcrypt, hashlib).
The bounds keep what an imported hash can make one Login cost within reason: a hostile import
must not turn every Login into a gigabyte of memory or minutes of CPU.

Accepted encodings:
- Argon2 PHC strings: ``$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>`` (also
  argon2i, argon2d), salt and hash in base64 without padding.
- bcrypt: ``$2a$``, ``$2b$``, ``$2y$`` + two-digit cost + 22 salt and 31 hash characters.
- PBKDF2-HMAC-SHA256 as passlib writes it: ``$pbkdf2-sha256$<rounds>$<salt>$<hash>`` in
  passlib's adapted base64 ("." for "+", no padding), and as Django writes it:
  ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (salt as text, hash in standard base64).

Error descriptions name the format and the rule, never the hash itself.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass

# What a hostile import may make one verification cost.
ARGON2_MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
ARGON2_MAX_TIME_COST = 20
ARGON2_MAX_PARALLELISM = 16
BCRYPT_MIN_COST, BCRYPT_MAX_COST = 4, 16
PBKDF2_MIN_ITERATIONS, PBKDF2_MAX_ITERATIONS = 1_000, 10_000_000
PASSWORD_HASH_MAX_CHARS = 1024
# Salts shorter than this are not salts; hashes shorter than this are not worth verifying.
MIN_SALT_BYTES = 8
MIN_DIGEST_BYTES = 16


class HashScheme(enum.StrEnum):
    ARGON2 = "argon2"
    BCRYPT = "bcrypt"
    PBKDF2_SHA256 = "pbkdf2-sha256"  # passlib's encoding
    DJANGO_PBKDF2_SHA256 = "django-pbkdf2-sha256"


@dataclass(frozen=True, slots=True)
class ParsedHash:
    """A recognised hash: its scheme and, for PBKDF2 (verified with hashlib), its parts."""

    scheme: HashScheme
    variant: str = ""  # argon2id | argon2i | argon2d for Argon2
    iterations: int = 0
    salt: bytes = b""
    digest: bytes = b""


class HashFormatError(ValueError):
    """The text is no hash of an accepted format, or its parameters are out of bounds."""


_ARGON2 = re.compile(
    r"\$(argon2id|argon2i|argon2d)\$v=(\d{1,3})\$m=(\d{1,10}),t=(\d{1,10}),p=(\d{1,10})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_PASSLIB_PBKDF2 = re.compile(r"\$pbkdf2-sha256\$(\d{1,9})\$([./A-Za-z0-9]*)\$([./A-Za-z0-9]+)")
_DJANGO_PBKDF2 = re.compile(r"pbkdf2_sha256\$(\d{1,9})\$([^$]+)\$([A-Za-z0-9+/]+={0,2})")


def _b64_unpadded(text: str, *, altchars: bytes = b"+/") -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as err:
        raise HashFormatError("salt or hash is not valid base64") from err


def _iterations(raw: str, scheme: str) -> int:
    iterations = int(raw)
    if not PBKDF2_MIN_ITERATIONS <= iterations <= PBKDF2_MAX_ITERATIONS:
        raise HashFormatError(
            f"{scheme} iterations must be {PBKDF2_MIN_ITERATIONS:,} to {PBKDF2_MAX_ITERATIONS:,}"
        )
    return iterations


def _argon2(match: re.Match[str]) -> ParsedHash:
    variant, version, memory, time_cost, parallelism = match.groups()[:5]
    if int(version) != 19:
        raise HashFormatError("argon2 hashes must be version 19 (v=19)")
    m, t, p = int(memory), int(time_cost), int(parallelism)
    if not 1 <= p <= ARGON2_MAX_PARALLELISM:
        raise HashFormatError(f"argon2 parallelism must be 1 to {ARGON2_MAX_PARALLELISM}")
    if not 8 * p <= m <= ARGON2_MAX_MEMORY_KIB:
        raise HashFormatError(f"argon2 memory must be 8*p to {ARGON2_MAX_MEMORY_KIB} KiB (1 GiB)")
    if not 1 <= t <= ARGON2_MAX_TIME_COST:
        raise HashFormatError(f"argon2 time cost must be 1 to {ARGON2_MAX_TIME_COST}")
    salt, digest = _b64_unpadded(match.group(6)), _b64_unpadded(match.group(7))
    if len(salt) < MIN_SALT_BYTES or len(digest) < MIN_DIGEST_BYTES:
        raise HashFormatError(
            f"argon2 salt must be at least {MIN_SALT_BYTES} bytes"
            f" and the hash at least {MIN_DIGEST_BYTES}"
        )
    return ParsedHash(HashScheme.ARGON2, variant=variant)


def _bcrypt(match: re.Match[str]) -> ParsedHash:
    cost = int(match.group(1))
    if not BCRYPT_MIN_COST <= cost <= BCRYPT_MAX_COST:
        raise HashFormatError(f"bcrypt cost must be {BCRYPT_MIN_COST} to {BCRYPT_MAX_COST}")
    return ParsedHash(HashScheme.BCRYPT)


def _passlib_pbkdf2(match: re.Match[str]) -> ParsedHash:
    iterations = _iterations(match.group(1), "pbkdf2-sha256")
    salt = _b64_unpadded(match.group(2), altchars=b"./")
    digest = _b64_unpadded(match.group(3), altchars=b"./")
    return _pbkdf2(HashScheme.PBKDF2_SHA256, iterations, salt, digest)


def _django_pbkdf2(match: re.Match[str]) -> ParsedHash:
    iterations = _iterations(match.group(1), "pbkdf2_sha256")
    salt = match.group(2).encode()
    digest = _b64_unpadded(match.group(3).rstrip("="))
    return _pbkdf2(HashScheme.DJANGO_PBKDF2_SHA256, iterations, salt, digest)


def _pbkdf2(scheme: HashScheme, iterations: int, salt: bytes, digest: bytes) -> ParsedHash:
    if len(salt) < MIN_SALT_BYTES:
        raise HashFormatError(f"pbkdf2 salt must be at least {MIN_SALT_BYTES} bytes")
    # SHA-256 gives 32 bytes per block; more than one block only multiplies Login's cost.
    if not MIN_DIGEST_BYTES <= len(digest) <= 32:
        raise HashFormatError(f"pbkdf2-sha256 hash must be {MIN_DIGEST_BYTES} to 32 bytes")
    return ParsedHash(scheme, iterations=iterations, salt=salt, digest=digest)


# (prefix, name in error descriptions, pattern, parser)
_PARSERS = (
    ("$argon2", "argon2", _ARGON2, _argon2),
    ("$2", "bcrypt", _BCRYPT, _bcrypt),
    ("$pbkdf2-sha256$", "pbkdf2-sha256", _PASSLIB_PBKDF2, _passlib_pbkdf2),
    ("pbkdf2_sha256$", "pbkdf2_sha256", _DJANGO_PBKDF2, _django_pbkdf2),
)

ACCEPTED_FORMATS = "argon2id/argon2i/argon2d PHC, bcrypt ($2a$/$2b$/$2y$), pbkdf2-sha256"


def parse_password_hash(text: str) -> ParsedHash:
    """The scheme and parameters of a hash in an accepted encoding; HashFormatError if not."""
    if not text:
        raise HashFormatError("password_hash is empty")
    if len(text) > PASSWORD_HASH_MAX_CHARS:
        raise HashFormatError(f"password_hash must be at most {PASSWORD_HASH_MAX_CHARS} characters")
    for prefix, name, pattern, parse in _PARSERS:
        if text.startswith(prefix):
            match = pattern.fullmatch(text)
            if match is None:
                raise HashFormatError(f"malformed {name} hash")
            return parse(match)
    raise HashFormatError(f"unknown password hash format; accepted: {ACCEPTED_FORMATS}")


def is_password_hash(text: str) -> bool:
    """Whether `text` is a hash in an accepted encoding (and so can verify a password)."""
    try:
        parse_password_hash(text)
    except HashFormatError:
        return False
    return True
