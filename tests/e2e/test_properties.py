"""Property-based: any value in any field of any request never gives INTERNAL or UNKNOWN, and
a refused call changes no row. A fixed seed and a bounded number of examples keep CI steady."""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import create_user
from userservice.v1 import auth_service_pb2, user_service_pb2
from userservice.v1.user_service_pb2_grpc import UserServiceStub

EXAMPLES = 30
SEED = 20261127
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Any code point a protobuf string may hold (no lone surrogates: they are not UTF-8).
ANY_CHARACTER = st.characters(exclude_categories=["Cs"])
HOSTILE_TEXT = st.one_of(
    st.text(ANY_CHARACTER, max_size=40),
    st.text(st.sampled_from("\x00\x01\x1b\x7f\x85\u200b\u202e\ufeff²①"), min_size=1, max_size=8),
    st.sampled_from(['"1"', '"²"', '"' + "9" * 5000 + '"', 'W/"1"', "x" * 100_000, "", "*"]),
    st.builds(lambda n: "a" * n, st.integers(0, 3000)),
)
METADATA_VALUE = st.text(st.sampled_from(string.printable[:-5]), max_size=300)

SERVICES = {
    "userservice.v1.UserService": user_service_pb2,
    "userservice.v1.AuthService": auth_service_pb2,
}
SKIP_TYPES = {"google.protobuf.Timestamp"}
STRUCT = "google.protobuf.Struct"
# Any JSON object (google.protobuf.Struct): hostile keys and strings, non-finite numbers,
# nesting past any bound.
JSON_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**60), 2**60),
        HOSTILE_TEXT,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(HOSTILE_TEXT, inner, max_size=4)
    ),
    max_leaves=30,
)
JSON_OBJECT = st.dictionaries(HOSTILE_TEXT, JSON_VALUE, max_size=6)


def _message_strategy(
    descriptor: Any, ids: st.SearchStrategy[str], depth: int = 0
) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            value: st.SearchStrategy[Any] = (
                st.one_of(ids, HOSTILE_TEXT) if field.name in ("id", "user_id") else HOSTILE_TEXT
            )
        elif field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
            value = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 100, 101]))
        elif field.type == FieldDescriptor.TYPE_ENUM:
            value = st.integers(-5, 10)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = st.booleans()
        elif field.type == FieldDescriptor.TYPE_MESSAGE and _is_string_map(field):
            # map<string, string> (labels): hostile keys and values.
            fields[field.name] = st.one_of(
                st.none(), st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=70)
            )
            continue
        elif field.type == FieldDescriptor.TYPE_MESSAGE and _is_struct(field):
            fields[field.name] = st.one_of(st.none(), JSON_OBJECT)
            continue
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 2:
            assert field.message_type is not None
            if field.message_type.full_name in SKIP_TYPES or _is_map(field):
                continue
            value = _message_strategy(field.message_type, ids, depth + 1)
        else:
            continue
        if field.is_repeated:
            value = st.lists(value, max_size=20)
        fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries({}, optional=fields)


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _is_struct(field: Any) -> bool:
    return field.message_type is not None and field.message_type.full_name == STRUCT


def _is_string_map(field: Any) -> bool:
    return _is_map(field) and all(
        f.type == FieldDescriptor.TYPE_STRING for f in field.message_type.fields
    )


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE and (_is_map(field) or _is_struct(field)):
            getattr(message, name).update(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            sub_cls = type(getattr(message, name)) if not field.is_repeated else None
            if field.is_repeated:
                container = getattr(message, name)
                for item in value:
                    _fill(container.add(), item)
            else:
                assert sub_cls is not None
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, name, value)
        else:
            setattr(message, name, value)
    return message


def _fill(message: Message, values: dict[str, Any]) -> None:
    built = _build(type(message), values)
    message.CopyFrom(built)


def _methods() -> list[tuple[str, str, type[Message], type[Message]]]:
    found = []
    for service_name, module in SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]]
        for method in service.methods:
            found.append(
                (
                    f"/{service_name}/{method.name}",
                    method.name,
                    getattr(module, method.input_type.name),
                    getattr(module, method.output_type.name),
                )
            )
    return found


METHODS = _methods()
SERVER_STREAMING = frozenset(
    f"/{service_name}/{method.name}"
    for service_name, module in SERVICES.items()
    for method in module.DESCRIPTOR.services_by_name[service_name.rsplit(".", 1)[1]].methods
    if method.server_streaming
)
TABLES = (
    "users",
    "user_labels",
    "refresh_tokens",
    "outbox",
    "idempotency_keys",
    "audit_events",
    "user_events",
)


def _snapshot(db: Engine, *, with_audit: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with db.connect() as conn:
        for table in TABLES:
            if table == "audit_events" and not with_audit:
                continue
            out[table] = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
        out["users_rows"] = sorted(
            tuple(map(str, row))
            for row in conn.execute(
                text("SELECT id, email, name, version, token_version, state FROM users")
            )
        )
    return out


@pytest.mark.parametrize(
    ("path", "name", "request_cls", "response_cls"), METHODS, ids=[m[1] for m in METHODS]
)
def test_no_input_gives_internal_and_a_refused_call_changes_nothing(
    admin_channel: grpc.Channel,
    users: UserServiceStub,
    db: Engine,
    path: str,
    name: str,
    request_cls: type[Message],
    response_cls: type[Message],
) -> None:
    target = create_user(users).id
    ids = st.sampled_from([target, str(uuid.uuid4()), target.upper()])
    call: Callable[..., Any] = admin_channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    if path in SERVER_STREAMING:
        # A stream never ends by itself: its first message (or its error) is the answer.
        stream: Callable[..., Any] = admin_channel.unary_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )

        def first_message(request: Message, **kwargs: Any) -> Any:
            responses = stream(request, **kwargs)
            try:
                return next(iter(responses))
            finally:
                responses.cancel()

        call = first_message

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(values=_message_strategy(request_cls.DESCRIPTOR, ids), request_id=METADATA_VALUE)
    def property_(values: dict[str, Any], request_id: str) -> None:
        request = _build(request_cls, values)
        before = _snapshot(db, with_audit=name != "Login")
        code = grpc.StatusCode.OK
        try:
            call(request, metadata=(("x-request-id", request_id),), timeout=30)
        except grpc.RpcError as err:
            code = err.code()
        assert code not in NEVER, (name, code, request)
        if code != grpc.StatusCode.OK:
            assert _snapshot(db, with_audit=name != "Login") == before, (name, code)

    property_()
