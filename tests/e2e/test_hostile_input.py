"""Hostile input gets INVALID_ARGUMENT with bounded details, never INTERNAL or UNKNOWN."""

from __future__ import annotations

import re
import socket
import struct
import uuid
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import PASSWORD, create_user, unique_email
from tests.e2e.conftest import CapturedLogs
from tests.e2e.integrity_helpers import audit_rows, stored_user
from tests.support import ServerThread, details_of, login
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
HOSTILE_ETAGS = ['"²"', '"①"', '"' + "9" * 5000 + '"', '"１"', "\u00a0"]


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def _trailer_bytes(err: grpc.RpcError) -> int:
    assert isinstance(err, grpc.Call)
    return sum(len(k) + len(v) for k, v in err.trailing_metadata() or ())


ETAG_CALLS: dict[str, Callable[[UserServiceStub, user_pb2.User, str], object]] = {
    "UpdateUser": lambda s, u, e: s.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(id=u.id, name="New Name", etag=e),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        )
    ),
    "DeleteUser": lambda s, u, e: s.DeleteUser(pb.DeleteUserRequest(id=u.id, etag=e)),
    "DisableUser": lambda s, u, e: s.DisableUser(pb.DisableUserRequest(id=u.id, etag=e)),
    "EnableUser": lambda s, u, e: s.EnableUser(pb.EnableUserRequest(id=u.id, etag=e)),
    "UnlockUser": lambda s, u, e: s.UnlockUser(pb.UnlockUserRequest(id=u.id, etag=e)),
    "ChangePassword": lambda s, u, e: s.ChangePassword(
        pb.ChangePasswordRequest(id=u.id, new_password="a fresh password 7", etag=e)
    ),
}


@pytest.mark.parametrize("method", list(ETAG_CALLS))
@pytest.mark.parametrize("etag", HOSTILE_ETAGS, ids=["superscript", "circled", "5000", "fw", "nb"])
def test_a_hostile_etag_is_invalid_argument_and_changes_nothing(
    users: UserServiceStub, db: Engine, method: str, etag: str
) -> None:
    user = create_user(users)
    before = stored_user(db, user.id)
    details = details_of(_refused(lambda: ETAG_CALLS[method](users, user, etag)))
    assert details.code == INVALID
    assert any(field.endswith("etag") for field in details.violations), details.violations
    assert stored_user(db, user.id) == before


@pytest.mark.parametrize("control", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\n"])
def test_control_characters_are_refused_before_the_database(
    users: UserServiceStub, control: str
) -> None:
    details = details_of(
        _refused(lambda: users.ListUsers(pb.ListUsersRequest(email=f"a{control}@x.test")))
    )
    assert details.code == INVALID
    assert details.violations == {"email": "must not contain control characters"}
    details = details_of(
        _refused(
            lambda: users.CreateUser(
                pb.CreateUserRequest(
                    email=unique_email(), name=f"E{control}ve", password=f"pass{control}word 1"
                )
            )
        )
    )
    assert set(details.violations) == {"name", "password"}
    # The password itself is never echoed.
    assert f"pass{control}word" not in details.message + repr(details.violations)


def test_a_login_with_a_nul_byte_is_refused_and_audited(auth: AuthServiceStub, db: Engine) -> None:
    before = len(audit_rows(db))
    rid = f"nul-{uuid.uuid4().hex}"
    err = _refused(
        lambda: auth.Login(
            auth_pb.LoginRequest(email="a\x00@x.test", password="whatever 123"),
            metadata=(("x-request-id", rid),),
        )
    )
    details = details_of(err)
    assert details.code == INVALID
    assert "email" in details.violations
    rows = audit_rows(db)[before:]
    mine = [r for r in rows if r["request_id"] == rid]
    assert len(mine) == 1
    assert mine[0]["action"] == "auth.login_failed"


@pytest.mark.parametrize(
    "request_",
    [
        pb.UpdateUserRequest(update_mask=field_mask_pb2.FieldMask(paths=["x"] * 10_000)),
        pb.UpdateUserRequest(update_mask=field_mask_pb2.FieldMask(paths=["p" * 50_000])),
        pb.UpdateUserRequest(
            user=user_pb2.User(roles=["r" * 100_000]),
            update_mask=field_mask_pb2.FieldMask(paths=["roles"]),
        ),
        pb.UpdateUserRequest(
            user=user_pb2.User(roles=[f"role{i}" for i in range(16)]),
            update_mask=field_mask_pb2.FieldMask(
                paths=[f"unknown_{i}_" + "z" * 50 for i in range(16)]
            ),
        ),
    ],
    ids=["10000-paths", "50000-char-path", "100000-char-role", "many-violations"],
)
def test_error_details_stay_small_whatever_the_request(
    users: UserServiceStub, request_: pb.UpdateUserRequest
) -> None:
    request_.user.id = request_.user.id or str(uuid.uuid4())
    err = _refused(lambda: users.UpdateUser(request_))
    details = details_of(err)
    assert details.code == INVALID
    assert _trailer_bytes(err) < 8 * 1024
    assert len(details.message) <= 512


def test_a_body_that_is_not_protobuf_is_invalid_argument_with_a_request_id(
    channel: grpc.Channel, logs: CapturedLogs
) -> None:
    call = channel.unary_unary(
        "/userservice.v1.AuthService/Login",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    rid = f"junk-{uuid.uuid4().hex}"
    err = _refused(lambda: call(b"\xff\xff\xff\xff\x0f", metadata=(("x-request-id", rid),)))
    details = details_of(err)
    assert details.code == INVALID
    assert details.reason == "MALFORMED_REQUEST"
    assert details.request_id == rid
    assert details.trailers["x-request-id"] == rid
    lines = logs.wait_for(lambda x: x.get("request_id") == rid and x["message"] != "rpc")
    assert [x["level"] for x in lines] == ["WARNING"]
    assert "exception" not in lines[0]
    assert not [x for x in logs.lines() if x["level"] == "ERROR"]


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload
    )


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field "without indexing" with a new name, neither string Huffman-coded."""

    def string(data: bytes) -> bytes:
        if len(data) < 127:
            return bytes([len(data)]) + data
        rest, out = len(data) - 127, bytearray([127])
        while rest >= 128:
            out.append(rest % 128 | 128)
            rest //= 128
        return bytes(out) + bytes([rest]) + data

    return b"\x00" + string(name) + string(value)


def _raw_unary_call(address: str, path: str, metadata: list[tuple[bytes, bytes]]) -> bytes:
    """One call over a bare HTTP/2 connection, with header bytes no grpc client would send
    (grpc refuses metadata values that are not printable ASCII); everything the server sent."""
    host, port = address.rsplit(":", 1)
    headers = b"".join(
        _hpack_literal(k, v)
        for k, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", address.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *metadata,
        ]
    )
    body = b"\x00" + struct.pack(">I", 0)  # an empty message
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _h2_frame(0x4, 0, 0, b"")  # SETTINGS
            + _h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
            + _h2_frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
        )
        received = b""
        while b"grpc-status" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.one_backend
def test_a_token_in_a_header_that_is_not_utf8_never_reaches_the_log(
    server: ServerThread, channel: grpc.Channel, users: UserServiceStub, logs: CapturedLogs
) -> None:
    user = create_user(users)
    token = login(channel, user.email, PASSWORD).access_token
    answer = _raw_unary_call(
        server.address,
        "/userservice.v1.UserService/GetUser",
        [(b"authorization", b"Bearer " + token.encode() + b"\xff")],
    )
    assert re.search(rb"grpc-status.16", answer), answer[-200:]  # UNAUTHENTICATED
    # grpc itself reports the value it could not decode.
    lines = logs.wait_for(lambda x: x["logger"] == "grpc._cython.cygrpc")
    assert lines
    assert token[20:60] not in logs.text
    assert all("not UTF-8" in x["message"] and x["level"] == "WARNING" for x in lines)
    assert not [x for x in logs.lines() if x["level"] == "ERROR" or "exception" in x]


def test_an_unknown_method_is_unimplemented_with_a_request_id(channel: grpc.Channel) -> None:
    call = channel.unary_unary(
        "/userservice.v1.UserService/NoSuchMethod",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    rid = f"nope-{uuid.uuid4().hex}"
    details = details_of(_refused(lambda: call(b"", metadata=(("x-request-id", rid),))))
    assert details.code == grpc.StatusCode.UNIMPLEMENTED
    assert details.request_id == rid


@pytest.mark.parametrize(
    "lookalike",
    ["ada\u200b@example.com", "ada@exam\u200dple.com", "\u2060ada@example.com"],
)
def test_invisible_format_characters_in_an_email_are_refused(
    users: UserServiceStub, lookalike: str
) -> None:
    details = details_of(
        _refused(
            lambda: users.CreateUser(
                pb.CreateUserRequest(email=lookalike, name="Ada Twin", password=PASSWORD)
            )
        )
    )
    assert details.code == INVALID
    assert "email" in details.violations


def test_a_name_may_not_begin_or_end_with_a_format_character(users: UserServiceStub) -> None:
    details = details_of(
        _refused(
            lambda: users.CreateUser(
                pb.CreateUserRequest(email=unique_email(), name="\u200bAda", password=PASSWORD)
            )
        )
    )
    assert "name" in details.violations


def test_a_genuine_internationalised_address_works(
    users: UserServiceStub, channel: grpc.Channel
) -> None:
    local = f"пользователь{uuid.uuid4().hex[:6]}"
    email = f"{local}@пример.рф"
    created = users.CreateUser(
        pb.CreateUserRequest(email=email, name="Иван Петров", password=PASSWORD)
    ).user
    assert created.email == email
    assert users.GetUser(pb.GetUserRequest(id=created.id)).user.email == email
    assert login(channel, email, PASSWORD).access_token
    found = users.ListUsers(pb.ListUsersRequest(email=email)).users
    assert [u.id for u in found] == [created.id]


@pytest.mark.parametrize(
    ("user_id", "code", "violations"),
    [
        ("", "", {"user_id", "code"}),
        ("not-a-uuid", "c" * 43, {"user_id"}),
        (None, "", {"code"}),
        (None, "c" * 65, {"code"}),
        (None, "c" * 1025, {"code"}),
    ],
    ids=["both-empty", "bad-id", "empty-code", "65-chars", "1025-chars"],
)
def test_a_malformed_verification_request_names_its_bad_fields(
    channel: grpc.Channel, user_id: str | None, code: str, violations: set[str]
) -> None:
    uid = user_id if user_id is not None else str(uuid.uuid4())
    request = pb.VerifyEmailRequest(user_id=uid, code=code)
    details = details_of(_refused(lambda: UserServiceStub(channel).VerifyEmail(request)))
    assert details.code == INVALID
    assert set(details.violations) == violations
    assert details.reason == "INVALID_ARGUMENT"


def test_a_malformed_send_verification_request_is_invalid(users: UserServiceStub) -> None:
    request = pb.SendVerificationEmailRequest(user_id="not-a-uuid")
    details = details_of(_refused(lambda: users.SendVerificationEmail(request)))
    assert details.code == INVALID
    assert set(details.violations) == {"user_id"}


@pytest.mark.parametrize(
    ("user_id", "code", "new_password", "violations"),
    [
        ("", "", "", {"user_id", "code", "new_password"}),
        ("not-a-uuid", "c" * 43, "a fine new password", {"user_id"}),
        (None, "c" * 65, "a fine new password", {"code"}),
        (None, "c" * 43, "short", {"new_password"}),
    ],
    ids=["all-empty", "bad-id", "65-char-code", "short-password"],
)
def test_a_malformed_recovery_request_names_its_bad_fields(
    channel: grpc.Channel,
    user_id: str | None,
    code: str,
    new_password: str,
    violations: set[str],
) -> None:
    uid = user_id if user_id is not None else str(uuid.uuid4())
    request = pb.RecoverPasswordRequest(user_id=uid, code=code, new_password=new_password)
    details = details_of(_refused(lambda: UserServiceStub(channel).RecoverPassword(request)))
    assert details.code == INVALID
    assert set(details.violations) == violations


def test_a_malformed_recovery_code_request_is_invalid(users: UserServiceStub) -> None:
    request = pb.CreateRecoveryCodeRequest(user_id="not-a-uuid")
    details = details_of(_refused(lambda: users.CreateRecoveryCode(request)))
    assert details.code == INVALID
    assert set(details.violations) == {"user_id"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _nested_struct(depth: int) -> bytes:
    """A google.protobuf.Struct `depth` levels deep, {"k": {"k": ...}}, encoded by hand:
    protobuf's own Python objects refuse to build one this deep."""
    struct = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(struct)) + struct  # Value.struct_value = 5
        entry = b"\x0a\x01k" + b"\x12" + _varint(len(value)) + value  # key = 1, value = 2
        struct = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields = 1
    return struct


@pytest.mark.parametrize("depth", [9, 150, 5000])
def test_admin_metadata_nested_too_deep_is_invalid_argument_and_changes_nothing(
    admin_channel: grpc.Channel, users: UserServiceStub, db: Engine, depth: int
) -> None:
    """Nesting past the limit (8) is a field violation; past protobuf's own recursion limit
    the body does not decode and is refused as malformed: never INTERNAL, nothing written."""
    created = create_user(users)
    base = pb.UpdateUserRequest(
        user=user_pb2.User(id=created.id, etag=created.etag),
        update_mask=field_mask_pb2.FieldMask(paths=["admin_metadata"]),
    ).SerializeToString()
    metadata = _nested_struct(depth)
    user = b"\x72" + _varint(len(metadata)) + metadata  # User.admin_metadata = 14
    body = base + b"\x0a" + _varint(len(user)) + user  # a second `user` merges into the first
    call = admin_channel.unary_unary(
        "/userservice.v1.UserService/UpdateUser",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    details = details_of(_refused(lambda: call(body)))
    assert details.code == INVALID
    if depth < 100:  # protobuf's recursion limit
        assert details.reason == "INVALID_ARGUMENT"
        assert set(details.violations) == {"user.admin_metadata"}
    else:
        assert details.reason == "MALFORMED_REQUEST"
    row = stored_user(db, created.id)
    assert row is not None and row["version"] == 1 and not row["admin_metadata"]
