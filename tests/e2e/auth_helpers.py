"""Helpers shared by the authentication end-to-end tests (matrix, JWT attacks, tokens, CLI)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tests.support import TEST_SECRET, TEST_SIGNING_KEY, ErrorDetails, details_of
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.jwt_tokens import public_jwk
from usersvc.adapters.tables import users as users_table
from usersvc.bootstrap import build_components
from usersvc.config import Settings
from usersvc.operator_tasks import issue_service_token

ROOT = Path(__file__).resolve().parents[2]
# Not on the common-password list, well within 8-128 characters.
PASSWORD = "tangerine orbit ladder 4711"
OTHER_PASSWORD = "velvet compass harbour 2209"
GENERIC_REASON = "UNAUTHENTICATED"


def unique_email(prefix: str = "auth") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def create_user(
    admin: UserServiceStub, *, email: str | None = None, password: str = PASSWORD
) -> user_pb2.User:
    """A plain (role-less) user created through the API by an admin stub."""
    request = pb.CreateUserRequest(
        email=email or unique_email(), name="Test User", password=password
    )
    user: user_pb2.User = admin.CreateUser(request).user
    return user


def login_pair(channel: grpc.Channel, email: str, password: str = PASSWORD) -> auth_pb.TokenPair:
    pair: auth_pb.TokenPair = (
        AuthServiceStub(channel).Login(auth_pb.LoginRequest(email=email, password=password)).tokens
    )
    return pair


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `authorization: Bearer <token>`."""
    return (("authorization", f"Bearer {token}"),)


def status_of(err: grpc.RpcError) -> grpc.StatusCode:
    if not isinstance(err, grpc.Call):
        raise TypeError(f"not a call's error: {err!r}")
    code: grpc.StatusCode = err.code()
    return code


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code of a call: OK when it returns, else the error's code."""
    try:
        call()
    except grpc.RpcError as err:
        return status_of(err)
    return grpc.StatusCode.OK


def failure_of(call: Callable[[], object]) -> ErrorDetails:
    """The rich error details of a call that must fail."""
    try:
        call()
    except grpc.RpcError as err:
        return details_of(err)
    raise AssertionError("the call succeeded but was expected to fail")


@dataclass(frozen=True)
class Refusal:
    """What a refused credential looks like; every refusal must look exactly like this."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str

    @classmethod
    def of(cls, details: ErrorDetails) -> Refusal:
        return cls(details.code, details.message, details.reason, details.domain)


def anonymous_refusal(channel: grpc.Channel) -> Refusal:
    """The refusal of a call without any token: the reference for the generic message."""
    stub = UserServiceStub(channel)
    details = failure_of(lambda: stub.ListUsers(pb.ListUsersRequest(page_size=1)))
    refusal = Refusal.of(details)
    assert refusal.code == grpc.StatusCode.UNAUTHENTICATED
    assert refusal.reason == GENERIC_REASON
    assert refusal.domain == "usersvc"
    return refusal


def user_row(db: Engine, user_id: str) -> dict[str, Any]:
    """The stored row of a user (typed columns, aware datetimes on both backends)."""
    with db.connect() as conn:
        row = conn.execute(select(users_table).where(users_table.c.id == uuid.UUID(user_id))).one()
    return dict(row._mapping)


def wait_for_code(
    call: Callable[[], object],
    wanted: grpc.StatusCode,
    *,
    timeout: float,
    interval: float = 0.2,
) -> tuple[grpc.StatusCode, list[grpc.StatusCode]]:
    """Call every `interval` s until it returns `wanted` or `timeout` s pass.

    Returns the last code and every code seen, in order.
    """
    deadline = time.monotonic() + timeout
    seen: list[grpc.StatusCode] = []
    while True:
        code = code_of(call)
        seen.append(code)
        if code == wanted or time.monotonic() >= deadline:
            return code, seen
        time.sleep(interval)


# --- JWT crafting -------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_json(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def signing_private_key() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(TEST_SIGNING_KEY.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def kid_of(key: ec.EllipticCurvePrivateKey) -> str:
    return public_jwk(key.public_key())["kid"]


def access_claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    """The claims a test server would put in an access token for `user_id`, with overrides.

    An override of None removes the claim.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "usersvc",
        "aud": "usersvc",
        "sub": user_id,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "roles": [],
        "ver": 1,
        "typ": "access",
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign_es256(
    claims: Mapping[str, Any],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """An ES256 token signed with `key` (the test signing key by default), kid = its thumbprint
    unless `headers` says otherwise (a header of None is left out)."""
    key = key or signing_private_key()
    merged: dict[str, Any] = {"kid": kid_of(key), **(headers or {})}
    all_headers = {name: value for name, value in merged.items() if value is not None}
    return jwt.encode(dict(claims), key, algorithm="ES256", headers=all_headers)


def unsigned_token(
    header: Mapping[str, Any], claims: Mapping[str, Any], signature: str = ""
) -> str:
    """header.payload.signature assembled by hand (PyJWT refuses to build the attacks)."""
    return f"{b64url_json(header)}.{b64url_json(claims)}.{signature}"


# --- Service accounts and the CLI ---------------------------------------------------------------


def service_token_for(settings: Settings, subject: str, ttl_seconds: int = 3600) -> str:
    """What `usersvc issue-service-token` prints, through the same operator task."""

    async def run() -> str:
        components = build_components(settings)
        try:
            return await issue_service_token(components, subject=subject, ttl_seconds=ttl_seconds)
        finally:
            await components.close()

    return asyncio.run(run())


def cli_env(database_url: str, data_dir: str) -> dict[str, str]:
    """Environment for a CLI subprocess that shares the test server's database and keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    env.update(
        USERSVC_DATABASE_URL=database_url,
        USERSVC_DATA_DIR=data_dir,
        USERSVC_SECRET_KEY=TEST_SECRET,
        USERSVC_JWT_SIGNING_KEY_FILE=str(TEST_SIGNING_KEY),
    )
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "usersvc", *args],
        input=stdin,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
