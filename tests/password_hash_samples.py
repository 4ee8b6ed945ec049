"""Password hashes in every format BatchCreateUsers imports, made the way other systems make
them: argon2-cffi, bcrypt, and PBKDF2-SHA256 encoded as passlib and Django write it."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable

import bcrypt
from argon2 import PasswordHasher, Type


def argon2(password: str, variant: Type = Type.ID) -> str:
    # Cheap parameters: weaker than the server's, so the first Login re-hashes.
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=variant).hash(password)


def bcrypt_hash(password: str, prefix: str = "2b", cost: int = 4) -> str:
    made = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    # $2a$ and $2y$ hashes differ from $2b$ only in the prefix (the algorithm is the same).
    return f"${prefix}${made[4:]}"


def _ab64(raw: bytes) -> str:
    """passlib's adapted base64: "." for "+", no padding."""
    return base64.b64encode(raw).decode().rstrip("=").replace("+", ".")


def passlib_pbkdf2(password: str, iterations: int = 1000) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"$pbkdf2-sha256${iterations}${_ab64(salt)}${_ab64(digest)}"


def django_pbkdf2(password: str, iterations: int = 1000) -> str:
    salt = base64.b32encode(os.urandom(15)).decode().lower()  # text, as Django's salts are
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


# Every accepted format, by a short name.
FORMATS: dict[str, Callable[[str], str]] = {
    "argon2id": argon2,
    "argon2i": lambda p: argon2(p, Type.I),
    "argon2d": lambda p: argon2(p, Type.D),
    "bcrypt-2a": lambda p: bcrypt_hash(p, "2a"),
    "bcrypt-2b": lambda p: bcrypt_hash(p, "2b"),
    "bcrypt-2y": lambda p: bcrypt_hash(p, "2y"),
    "pbkdf2-sha256-passlib": passlib_pbkdf2,
    "pbkdf2-sha256-django": django_pbkdf2,
}
