"""Forged, tampered and misused access tokens: each one gets the same generic UNAUTHENTICATED.

Every crafted token differs from an accepted control token in one respect only, so a refusal
is caused by that respect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.e2e.auth_helpers import (
    Refusal,
    access_claims,
    anonymous_refusal,
    b64url,
    b64url_decode,
    b64url_json,
    code_of,
    create_user,
    failure_of,
    kid_of,
    login_pair,
    sign_es256,
    signing_private_key,
    unsigned_token,
)
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.jwt_tokens import public_jwk


class Victim(NamedTuple):
    id: str
    email: str


@pytest.fixture(scope="module")
def victim(users: UserServiceStub) -> Victim:
    """A plain user whose tokens the attacks are about (token version 1, never revoked)."""
    user = create_user(users)
    return Victim(user.id, user.email)


@pytest.fixture(scope="module")
def generic(channel: grpc.Channel) -> Refusal:
    return anonymous_refusal(channel)


def get_self(channel: grpc.Channel, victim: Victim, authorization: str) -> Callable[[], object]:
    """GetUser on the victim itself: allowed for the victim's own valid token."""
    stub = UserServiceStub(channel)
    return lambda: stub.GetUser(
        pb.GetUserRequest(id=victim.id), metadata=(("authorization", authorization),)
    )


def assert_refused(call: Callable[[], object], generic: Refusal) -> None:
    assert Refusal.of(failure_of(call)) == generic


# --- Controls: the hand-made tokens are accepted when nothing is wrong with them ----------------


@pytest.mark.one_backend
def test_control_token_signed_by_hand_is_accepted(channel: grpc.Channel, victim: Victim) -> None:
    token = sign_es256(access_claims(victim.id))
    assert code_of(get_self(channel, victim, f"Bearer {token}")) == grpc.StatusCode.OK


@pytest.mark.one_backend
def test_control_raw_es256_signature_is_accepted(channel: grpc.Channel, victim: Victim) -> None:
    """Header, payload and signature assembled without PyJWT, as the attacks below are."""
    key = signing_private_key()
    header = {"alg": "ES256", "typ": "JWT", "kid": kid_of(key)}
    signing_input = f"{b64url_json(header)}.{b64url_json(access_claims(victim.id))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    signature = b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    token = f"{signing_input}.{signature}"
    assert code_of(get_self(channel, victim, f"Bearer {token}")) == grpc.StatusCode.OK


@pytest.mark.one_backend
def test_control_clock_skew_within_leeway_is_accepted(
    channel: grpc.Channel, victim: Victim
) -> None:
    now = int(time.time())
    for claims in (
        access_claims(victim.id, iat=now + 10),
        access_claims(victim.id, nbf=now + 10),
        access_claims(victim.id, iat=now - 700, exp=now - 10),
    ):
        token = sign_es256(claims)
        assert code_of(get_self(channel, victim, f"Bearer {token}")) == grpc.StatusCode.OK, claims


@pytest.mark.one_backend
def test_control_real_token_is_accepted(channel: grpc.Channel, victim: Victim) -> None:
    token = login_pair(channel, victim.email).access_token
    assert code_of(get_self(channel, victim, f"Bearer {token}")) == grpc.StatusCode.OK


# --- Crafted tokens -----------------------------------------------------------------------------


def _alg_none(alg: str) -> Callable[[str], str]:
    def build(user_id: str) -> str:
        header = {"alg": alg, "typ": "JWT", "kid": kid_of(signing_private_key())}
        return unsigned_token(header, access_claims(user_id))

    return build


def _hs256_with_public_key(user_id: str) -> str:
    """HS256 with the server's public key PEM as the HMAC secret (key confusion)."""
    key = signing_private_key()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": kid_of(key)}
    signing_input = f"{b64url_json(header)}.{b64url_json(access_claims(user_id))}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def _other_key(user_id: str, *, our_kid: bool) -> str:
    other = ec.generate_private_key(ec.SECP256R1())
    headers = {"kid": kid_of(signing_private_key())} if our_kid else None
    return sign_es256(access_claims(user_id), key=other, headers=headers)


def _tampered(user_id: str) -> str:
    """A valid token whose payload now grants admin, with the original signature."""
    token = sign_es256(access_claims(user_id))
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["roles"] = ["admin"]
    return f"{header}.{b64url_json(claims)}.{signature}"


def _bad_signature(user_id: str) -> str:
    token = sign_es256(access_claims(user_id))
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[-1] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def _claims(**overrides: Any) -> Callable[[str], str]:
    return lambda user_id: sign_es256(access_claims(user_id, **overrides))


def _times(**offsets: int) -> Callable[[str], str]:
    """Time claims at these offsets (seconds) from the moment the token is built."""

    def build(user_id: str) -> str:
        now = int(time.time())
        return sign_es256(access_claims(user_id, **{k: now + v for k, v in offsets.items()}))

    return build


def _header(**headers: Any) -> Callable[[str], str]:
    return lambda user_id: sign_es256(access_claims(user_id), headers=headers)


OWN_JWK = public_jwk(signing_private_key().public_key())

CRAFTED: dict[str, Callable[[str], str]] = {
    "alg-none": _alg_none("none"),
    "alg-None": _alg_none("None"),
    "alg-NONE": _alg_none("NONE"),
    "alg-nOnE": _alg_none("nOnE"),
    "hs256-with-public-key-pem": _hs256_with_public_key,
    # The leeway is 30 s; these are well beyond it.
    "expired": _times(iat=-3600, exp=-120),
    "nbf-in-the-future": _times(nbf=120),
    "iat-in-the-future-beyond-leeway": _times(iat=120, exp=900),
    "wrong-iss": _claims(iss="https://evil.example"),
    "iss-prefix-of-ours": _claims(iss="users"),
    "iss-extends-ours": _claims(iss="usersvc-staging"),
    "wrong-aud": _claims(aud="billing"),
    "aud-list-without-ours": _claims(aud=["billing", "reports"]),
    "unknown-kid": lambda uid: _other_key(uid, our_kid=False),
    "our-kid-other-key": lambda uid: _other_key(uid, our_kid=True),
    "no-kid": _header(kid=None),
    "tampered-payload-roles-admin": _tampered,
    "bad-signature": _bad_signature,
    "missing-exp": _claims(exp=None),
    "missing-iat": _claims(iat=None),
    "missing-iss": _claims(iss=None),
    "missing-aud": _claims(aud=None),
    "missing-sub": _claims(sub=None),
    "missing-ver": _claims(ver=None),
    "missing-roles": _claims(roles=None),
    "missing-typ": _claims(typ=None),
    "typ-refresh": _claims(typ="refresh"),
    "stale-ver": _claims(ver=0),
    "future-ver": _claims(ver=2),
    "ver-as-string": _claims(ver="1"),
    # "pcr" restricts a token; anything but a boolean is not a value of it.
    "pcr-as-string": _claims(pcr="false"),
    "pcr-as-number": _claims(pcr=0),
    "sub-not-a-uuid": _claims(sub="admin"),
    "unknown-subject": lambda uid: sign_es256(access_claims(str(uuid.uuid4()), roles=["admin"])),
    "jku-header": _header(jku="https://evil.example/jwks.json"),
    "x5u-header": _header(x5u="https://evil.example/cert.pem"),
    "jwk-header": _header(jwk=OWN_JWK),
    "x5c-header": _header(x5c=["MIIB"]),
    "garbage": lambda uid: "not-a-jwt",
    "two-segments": lambda uid: ".".join(sign_es256(access_claims(uid)).split(".")[:2]),
}


@pytest.mark.one_backend
@pytest.mark.parametrize("attack", list(CRAFTED))
def test_crafted_token_is_refused(
    attack: str, channel: grpc.Channel, victim: Victim, generic: Refusal
) -> None:
    token = CRAFTED[attack](victim.id)
    # The tampered token claims admin: try what only an admin may do, and what the victim may.
    assert_refused(get_self(channel, victim, f"Bearer {token}"), generic)
    stub = UserServiceStub(channel)
    assert_refused(
        lambda: stub.ListUsers(
            pb.ListUsersRequest(page_size=1), metadata=(("authorization", f"Bearer {token}"),)
        ),
        generic,
    )


def test_refresh_token_is_not_an_access_token(
    channel: grpc.Channel, victim: Victim, generic: Refusal
) -> None:
    pair = login_pair(channel, victim.email)
    assert code_of(get_self(channel, victim, f"Bearer {pair.access_token}")) == grpc.StatusCode.OK
    assert_refused(get_self(channel, victim, f"Bearer {pair.refresh_token}"), generic)


def test_token_of_a_deleted_user_is_refused(
    channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    user = create_user(users)
    token = login_pair(channel, user.email).access_token
    target = Victim(user.id, user.email)
    assert code_of(get_self(channel, target, f"Bearer {token}")) == grpc.StatusCode.OK
    users.DeleteUser(pb.DeleteUserRequest(id=user.id))
    assert_refused(get_self(channel, target, f"Bearer {token}"), generic)


def test_token_with_a_stale_version_is_refused(
    channel: grpc.Channel, users: UserServiceStub, generic: Refusal
) -> None:
    """A real token whose user's token version moved on (a password change)."""
    user = create_user(users)
    target = Victim(user.id, user.email)
    old = login_pair(channel, user.email).access_token
    users.ChangePassword(pb.ChangePasswordRequest(id=user.id, new_password="brand new words 77"))
    assert_refused(get_self(channel, target, f"Bearer {old}"), generic)
    # The same claims at the current version are fine: only `ver` was wrong.
    current = sign_es256(access_claims(user.id, ver=2))
    assert code_of(get_self(channel, target, f"Bearer {current}")) == grpc.StatusCode.OK


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "{token}",
        "Bearer{token}",
        "Token {token}",
        "Basic {token}",
        "Bearer {token} {token}",
    ],
    ids=[
        "empty",
        "scheme-only",
        "scheme-and-space",
        "no-scheme",
        "no-space",
        "token-scheme",
        "basic-scheme",
        "two-tokens",
    ],
)
def test_malformed_authorization_header_is_refused(
    header: str, channel: grpc.Channel, victim: Victim, generic: Refusal
) -> None:
    token = sign_es256(access_claims(victim.id))  # a valid token inside a malformed header
    assert_refused(get_self(channel, victim, header.format(token=token)), generic)


# --- Verification by another service, from GetJwks alone ----------------------------------------


@pytest.mark.one_backend
def test_another_service_verifies_tokens_with_get_jwks_only(
    channel: grpc.Channel, victim: Victim
) -> None:
    jwks = AuthServiceStub(channel).GetJwks(auth_pb.GetJwksRequest()).keys
    assert jwks
    token = login_pair(channel, victim.email).access_token
    kid = jwt.get_unverified_header(token)["kid"]
    matching = [k for k in jwks if k.kid == kid]
    assert len(matching) == 1
    published = matching[0]
    assert (published.kty, published.crv, published.alg, published.use) == (
        "EC",
        "P-256",
        "ES256",
        "sig",
    )
    # The kid is the RFC 7638 thumbprint of the published key.
    canonical = json.dumps(
        {"crv": published.crv, "kty": published.kty, "x": published.x, "y": published.y},
        separators=(",", ":"),
        sort_keys=True,
    )
    assert kid == b64url(hashlib.sha256(canonical.encode()).digest())

    key = jwt.PyJWK(
        {
            "kty": published.kty,
            "crv": published.crv,
            "kid": published.kid,
            "alg": published.alg,
            "use": published.use,
            "x": published.x,
            "y": published.y,
        }
    )
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="usersvc", issuer="usersvc")
    assert claims["sub"] == victim.id
    assert claims["typ"] == "access"
    assert claims["roles"] == []
    # The same key refuses a token from anyone else.
    forged = sign_es256(access_claims(victim.id), key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key, algorithms=["ES256"], audience="usersvc", issuer="usersvc")
