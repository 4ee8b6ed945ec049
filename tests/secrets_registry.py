"""Secrets the test suite used, and a detector for them, for the final scan of the audit trail.

Three sources, because no single one sees everything:

- a registry filled at run time: `remember()` by hand, or `record_secrets(channel)`, a client
  interceptor that remembers every password field of a request and every token of a response;
- the password literals of the test sources themselves (`literal_secrets_in_tests`), read with
  `ast`, with f-strings turned into patterns (f"Sekret-{x}" -> r"Sekret\\-.+?");
- shapes no password list can enumerate: Argon2 hashes, JWTs, refresh tokens (43 base64url
  characters, or any string whose SHA-256 is a stored refresh token hash).
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

TESTS_ROOT = Path(__file__).resolve().parent

# Request fields whose values are secrets, and response fields that are tokens.
SECRET_FIELDS = frozenset(
    {
        "password",
        "new_password",
        "current_password",
        "password_hash",
        "refresh_token",
        "access_token",
    }
)
# Names in test sources whose string values are secrets.
SECRET_NAME = re.compile(r"(?i)password|passwd|passphrase|secret")
SECRET_KEYWORDS = frozenset({"password", "new_password", "current_password"})
# Shorter strings cannot be passwords the service accepted (8-128 characters).
MIN_SECRET_LENGTH = 8
# Constant text an f-string secret must have before it is worth a pattern.
MIN_PATTERN_CONSTANT = 6

_lock = threading.Lock()
_remembered: set[str] = set()


def remember(*values: str) -> None:
    """Add secrets (passwords, tokens) used during the session."""
    with _lock:
        _remembered.update(v for v in values if v)


def remembered() -> frozenset[str]:
    with _lock:
        return frozenset(_remembered)


def _collect(message: Message) -> list[str]:
    found: list[str] = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None:
            items = value if descriptor.is_repeated else [value]
            for item in items:
                if isinstance(item, Message):
                    found.extend(_collect(item))
        elif (
            descriptor.name in SECRET_FIELDS
            and isinstance(value, str)
            # Hostile-input tests send one-letter "passwords" (RecoverPassword.new_password);
            # no password the service accepts is that short, and as a secret "v" would match
            # every text.
            and len(value) >= MIN_SECRET_LENGTH
        ):
            found.append(value)
    return found


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if isinstance(request, Message):
            remember(*_collect(request))
        outcome = continuation(details, request)

        def record(done: Any) -> None:
            if done.exception() is None and isinstance(done.result(), Message):
                remember(*_collect(done.result()))

        outcome.add_done_callback(record)
        return outcome


def record_secrets(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, remembering the secrets of every unary call made through it."""
    return grpc.intercept_channel(channel, _Recorder())


# --- secrets written into the test sources ----------------------------------------------------


@dataclass
class SourceSecrets:
    literals: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)


def _string_of(node: ast.expr) -> str | None:
    """The value of a string constant, or of `"x" * n` with constants; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        for text, count in ((node.left, node.right), (node.right, node.left)):
            value = _string_of(text)
            if (
                value is not None
                and isinstance(count, ast.Constant)
                and isinstance(count.value, int)
                and 0 < count.value <= 1000
            ):
                return value * count.value
    return None


def _pattern_of(node: ast.expr) -> str | None:
    """A regex for an f-string: constant parts literally, each placeholder as `.+?`."""
    if not isinstance(node, ast.JoinedStr):
        return None
    parts: list[str] = []
    constant = 0
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            parts.append(re.escape(value.value))
            constant += len(value.value)
        else:
            parts.append(".+?")
    return "".join(parts) if constant >= MIN_PATTERN_CONSTANT else None


def _add(found: SourceSecrets, node: ast.expr) -> None:
    value = _string_of(node)
    if value is not None and len(value) >= MIN_SECRET_LENGTH:
        found.literals.add(value)
    pattern = _pattern_of(node)
    if pattern is not None:
        found.patterns.add(pattern)


def _target_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.Tuple | ast.List):
        return [n for elt in node.elts for n in _target_names(elt)]
    return []


def literal_secrets_in_tests(root: Path = TESTS_ROOT) -> SourceSecrets:
    """Strings the test sources assign to secret-named variables or pass as passwords."""
    found = SourceSecrets()
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                names = [n for t in node.targets for n in _target_names(t)]
                if any(SECRET_NAME.search(n) for n in names):
                    _add(found, node.value)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                if any(SECRET_NAME.search(n) for n in _target_names(node.target)):
                    _add(found, node.value)
            elif isinstance(node, ast.keyword) and node.arg in SECRET_KEYWORDS:
                _add(found, node.value)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                # Defaults of secret-named parameters, such as `password: str = PASSWORD`.
                args = node.args
                positional = [*args.posonlyargs, *args.args]
                for arg, default in zip(
                    positional[len(positional) - len(args.defaults) :], args.defaults, strict=True
                ):
                    if SECRET_NAME.search(arg.arg):
                        _add(found, default)
                for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                    if kw_default is not None and SECRET_NAME.search(arg.arg):
                        _add(found, kw_default)
    return found


# --- the detector ----------------------------------------------------------------------------

_B64URL_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")
_DOTTED = re.compile(r"[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_HEX64 = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
# The shapes of the password hashes BatchCreateUsers imports (bcrypt, passlib and Django PBKDF2).
_IMPORTED_HASH = re.compile(
    r"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{20}|\$pbkdf2-sha256\$\d+\$|pbkdf2_sha256\$\d+\$"
)


def _b64url_json_object(part: str) -> bool:
    try:
        decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        return isinstance(json.loads(decoded), dict)
    except (binascii.Error, ValueError):
        return False


def looks_like_refresh_token(run: str) -> bool:
    """secrets.token_urlsafe(32): 43 random base64url characters, mixed case, varied."""
    return (
        len(run) >= 40
        and any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and len(set(run)) >= 20
    )


@dataclass
class Detector:
    """Finds secrets in text; every finding says what it found, never the whole secret."""

    secrets: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()
    refresh_token_hashes: frozenset[str] = frozenset()
    password_hashes: frozenset[str] = frozenset()
    extra: list[Callable[[str], list[str]]] = field(default_factory=list)

    @classmethod
    def for_suite(
        cls,
        *,
        refresh_token_hashes: Iterable[str] = (),
        password_hashes: Iterable[str] = (),
        also: Iterable[str] = (),
    ) -> Detector:
        source = literal_secrets_in_tests()
        return cls(
            secrets=frozenset({*remembered(), *source.literals, *also}),
            patterns=tuple(re.compile(p) for p in sorted(source.patterns)),
            refresh_token_hashes=frozenset(refresh_token_hashes),
            password_hashes=frozenset(h for h in password_hashes if h),
        )

    def findings(self, text: str) -> list[str]:
        found: list[str] = []
        if "$argon2" in text:
            found.append("an Argon2 hash ($argon2...)")
        if _IMPORTED_HASH.search(text):
            found.append("a bcrypt or PBKDF2 hash")
        for secret in self.secrets:
            if secret in text:
                found.append(f"a secret used by the tests ({secret[:3]}...)")
        for pattern in self.patterns:
            if pattern.search(text):
                found.append(f"a value of a secret-shaped f-string /{pattern.pattern[:12]}.../")
        for password_hash in self.password_hashes:
            if password_hash in text:
                found.append("a stored password hash")
        for dotted in _DOTTED.finditer(text):
            first = dotted.group().split(".", 1)[0]
            if _b64url_json_object(first):
                found.append("a JWT (base64url JSON header.payload.signature)")
        for run in _B64URL_RUN.findall(text):
            if looks_like_refresh_token(run):
                found.append("a refresh-token-shaped string (40+ random base64url characters)")
            if hashlib.sha256(run.encode()).hexdigest() in self.refresh_token_hashes:
                found.append("a refresh token issued during the suite")
        for hex64 in _HEX64.findall(text):
            if hex64 in self.refresh_token_hashes:
                found.append("a stored refresh token hash")
        return found
