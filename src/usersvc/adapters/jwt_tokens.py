"""ES256 access tokens: keys parsed once, signing, strict verification, JWKS publication."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from usersvc.adapters.secret_files import create_once
from usersvc.domain.auth import PASSWORD_CHANGE_REQUIRED_CLAIM
from usersvc.domain.errors import InvalidAccessToken

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
ACCESS = "access"
# Headers that would let a token choose its own verification key (RFC 8725 3.10).
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
VERIFIED_CACHE_SIZE = 10_000


def _b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The JWK of a P-256 public key, with its RFC 7638 thumbprint as kid."""
    numbers = public_key.public_numbers()
    core = {"crv": "P-256", "kty": "EC", "x": _b64(numbers.x), "y": _b64(numbers.y)}
    canonical = json.dumps(core, separators=(",", ":"), sort_keys=True).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {**core, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey:
    data = path.read_bytes()
    try:
        key: Any = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or not (
        isinstance(key.curve, ec.SECP256R1)
    ):
        raise ValueError(f"{path}: not an EC P-256 key (ES256 needs one)")
    return key


def generate_private_key_file(path: Path) -> bool:
    """Write a new P-256 private key, readable by the owner only, unless `path` exists;
    True if this call created it."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return create_once(path, pem)


@dataclass(frozen=True)
class KeySet:
    """The signing key and every key that verifies; parsed once at start-up."""

    signing_kid: str
    signing_key: ec.EllipticCurvePrivateKey
    verification_keys: dict[str, ec.EllipticCurvePublicKey]
    jwks: list[dict[str, str]]

    @classmethod
    def load(cls, signing_key_file: Path, verification_key_files: list[Path]) -> KeySet:
        signing = _load_key(signing_key_file)
        if not isinstance(signing, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{signing_key_file}: the signing key must be a private key")
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        jwks: list[dict[str, str]] = []
        for key in [signing, *(_load_key(p) for p in verification_key_files)]:
            public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
            jwk = public_jwk(public)
            if jwk["kid"] not in keys:
                keys[jwk["kid"]] = public
                jwks.append(jwk)
        return cls(
            signing_kid=public_jwk(signing.public_key())["kid"],
            signing_key=signing,
            verification_keys=keys,
            jwks=jwks,
        )


class AccessTokenCodec:
    """Issues and verifies access tokens with pinned algorithm, issuer and audience."""

    def __init__(
        self, keys: KeySet, *, issuer: str, audience: str, ttl_seconds: int, leeway: float
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds
        self._leeway = leeway
        self._jwt = jwt.PyJWT(options={"require": REQUIRED_CLAIMS})
        # Verified tokens by their exact text: a caller reuses its token for many calls, and
        # an ES256 verification costs more than the rest of a GetUser. Only time can make a
        # verified token invalid, so a hit re-checks exp alone.
        self._verified: dict[str, dict[str, Any]] = {}

    @property
    def jwks(self) -> list[dict[str, str]]:
        return self._keys.jwks

    def issue(
        self,
        *,
        subject: uuid.UUID,
        roles: tuple[str, ...],
        version: int,
        now: float | None = None,
        ttl_seconds: int | None = None,
        password_change_required: bool = False,
    ) -> tuple[str, float]:
        """A signed token and its expiry (epoch seconds)."""
        issued = int(now if now is not None else time.time())
        expires = issued + (ttl_seconds if ttl_seconds is not None else self._ttl)
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(subject),
            "iat": issued,
            "exp": expires,
            "jti": uuid.uuid4().hex,
            "roles": list(roles),
            "ver": version,
            "typ": ACCESS,
        }
        if password_change_required:
            # Only when set: such a token may change the password and nothing else.
            claims[PASSWORD_CHANGE_REQUIRED_CLAIM] = True
        token = jwt.encode(
            claims,
            self._keys.signing_key,
            algorithm=ALGORITHM,
            headers={"kid": self._keys.signing_kid},
        )
        return token, float(expires)

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid access token; InvalidAccessToken otherwise."""
        cached = self._verified.get(token)
        if cached is not None:
            if cached["exp"] + self._leeway > time.time():
                return cached
            del self._verified[token]
            raise InvalidAccessToken("expired")
        claims = self._verify_uncached(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _verify_uncached(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidAccessToken(f"malformed token: {err}") from err
        if header.get("alg") != ALGORITHM:
            raise InvalidAccessToken(f"algorithm {header.get('alg')!r} is not allowed")
        if FORBIDDEN_HEADERS & header.keys():
            raise InvalidAccessToken("token names its own key")
        key = self._keys.verification_keys.get(str(header.get("kid")))
        if key is None:
            raise InvalidAccessToken("unknown kid")
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
            )
        except jwt.PyJWTError as err:
            raise InvalidAccessToken(str(err)) from err
        if claims.get("typ") != ACCESS:
            raise InvalidAccessToken("not an access token")
        # type() is, not isinstance: True would pass as version 1.
        if type(claims.get("ver")) is not int or not isinstance(claims.get("roles"), list):
            raise InvalidAccessToken("missing ver or roles")
        if type(claims.get(PASSWORD_CHANGE_REQUIRED_CLAIM, False)) is not bool:
            raise InvalidAccessToken("pcr is not a boolean")
        return claims


def load_or_create_keys(
    signing_key_file: Path | None, verification_key_files: list[Path], data_dir: Path
) -> KeySet:
    """The configured keys; in development without one, a key generated into data_dir."""
    if signing_key_file is None:
        signing_key_file = data_dir / "jwt_signing_key.pem"
        if not signing_key_file.exists() and generate_private_key_file(signing_key_file):
            log.warning(
                "no USERSVC_JWT_SIGNING_KEY_FILE set: generated a development signing key in %s",
                signing_key_file,
            )
    return KeySet.load(signing_key_file, verification_key_files)
