"""JwksVerifier without a server: key rotation, rate-limited refresh, failed fetches, and
the claims and headers it refuses."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from userservice.client.jwks import InvalidToken, JwksVerifier
from userservice.v1 import auth_service_pb2


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


class Signer:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> auth_service_pb2.Jwk:
        numbers = self.key.public_key().public_numbers()
        return auth_service_pb2.Jwk(
            kty="EC", crv="P-256", kid=self.kid, alg="ES256", use="sig",
            x=_b64(numbers.x), y=_b64(numbers.y),
        )  # fmt: skip

    def token(self, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "usersvc", "aud": "usersvc", "sub": "u1", "iat": now, "exp": now + 60}
        body |= {"typ": "access", "roles": ["admin"], **claims}
        return jwt.encode(
            body, self.key, algorithm="ES256", headers={"kid": self.kid, **(headers or {})}
        )


class Jwks:
    """A GetJwks that serves whatever keys are published, and can fail."""

    def __init__(self, *signers: Signer) -> None:
        self.published = list(signers)
        self.failing = False
        self.calls = 0

    def __call__(self) -> auth_service_pb2.GetJwksResponse:
        self.calls += 1
        if self.failing:
            raise ConnectionError("usersvc unreachable")
        return auth_service_pb2.GetJwksResponse(keys=[s.jwk() for s in self.published])


def test_a_rotated_in_key_is_fetched_on_its_first_token() -> None:
    old, new = Signer("old"), Signer("new")
    jwks = Jwks(old)
    now = [100.0]
    verifier = JwksVerifier(jwks, clock=lambda: now[0], min_refresh_interval=30)
    assert verifier.verify(old.token())["sub"] == "u1"
    jwks.published.append(new)
    now[0] += 31
    assert verifier.verify(new.token())["sub"] == "u1"
    assert jwks.calls == 2


def test_unknown_kids_refresh_at_most_once_per_interval() -> None:
    known, stranger = Signer("known"), Signer("stranger")
    jwks = Jwks(known)
    now = [0.0]
    verifier = JwksVerifier(jwks, clock=lambda: now[0], min_refresh_interval=30)
    verifier.verify(known.token())
    for _ in range(10):
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(stranger.token())
    assert jwks.calls == 1
    now[0] = 30.0
    with pytest.raises(InvalidToken):
        verifier.verify(stranger.token())
    assert jwks.calls == 2


def test_keys_are_refetched_when_old_and_kept_when_the_fetch_fails() -> None:
    signer = Signer("k")
    jwks = Jwks(signer)
    now = [0.0]
    verifier = JwksVerifier(jwks, clock=lambda: now[0], max_age=600, min_refresh_interval=30)
    verifier.verify(signer.token())
    now[0] = 601.0
    jwks.failing = True
    assert verifier.verify(signer.token())["sub"] == "u1"  # the cached key still verifies
    assert jwks.calls == 2
    verifier.verify(signer.token())
    assert jwks.calls == 2, "no second attempt within the interval"


def test_no_keys_at_all_is_an_invalid_token_not_a_crash() -> None:
    jwks = Jwks(Signer("k"))
    jwks.failing = True
    with pytest.raises(InvalidToken, match="no verification keys"):
        JwksVerifier(jwks).verify(Signer("k").token())


@pytest.mark.parametrize(
    ("headers", "claims"),
    [
        ({"jku": "https://attacker.example/jwks"}, {}),
        ({"jwk": {"kty": "EC"}}, {}),
        ({}, {"typ": "refresh"}),
        ({}, {"iss": "someone-else"}),
        ({}, {"aud": "another-service"}),
        ({}, {"exp": int(time.time()) - 3600}),
    ],
)
def test_refused_headers_and_claims(headers: dict[str, Any], claims: dict[str, Any]) -> None:
    signer = Signer("k")
    verifier = JwksVerifier(Jwks(signer))
    with pytest.raises(InvalidToken):
        verifier.verify(signer.token(headers, **claims))


def test_other_algorithms_and_missing_claims_are_refused() -> None:
    signer = Signer("k")
    verifier = JwksVerifier(Jwks(signer))
    hs256 = jwt.encode({"sub": "u1"}, "s" * 32, algorithm="HS256", headers={"kid": "k"})
    with pytest.raises(InvalidToken, match="ES256"):
        verifier.verify(hs256)
    no_sub = jwt.encode(
        {"iss": "usersvc", "aud": "usersvc", "iat": int(time.time()), "exp": int(time.time()) + 60,
         "typ": "access"},
        signer.key, algorithm="ES256", headers={"kid": "k"},
    )  # fmt: skip
    with pytest.raises(InvalidToken):
        verifier.verify(no_sub)
