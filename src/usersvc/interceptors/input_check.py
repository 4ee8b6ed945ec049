"""Every string of every request is checked before anything else reads it: no control
characters (NUL and the rest of C0, DEL, C1), bounded lengths, bounded repeated fields.

PostgreSQL text cannot hold NUL, and neither database should hold the rest; refusing them
here, for every field of every method at once, keeps both databases alike and the answer an
INVALID_ARGUMENT with the field's path. The fields to look at are worked out once per message
type, so a call costs one regular-expression search per string it carries.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from usersvc.domain.errors import FieldViolation, ValidationFailed
from usersvc.interceptors.base import (
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
    checked_first,
)
from usersvc.services.user_import import BATCH_CREATE_MAX
from usersvc.services.users import BATCH_GET_MAX

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
EDGE_SPACE = " \t\r\n"
MAX_STRING_CHARS = 1024
MAX_REPEATED = 16
# Repeated fields whose contract allows more entries than MAX_REPEATED, by full field name.
REPEATED_LIMITS: Mapping[str, int] = {
    "userservice.v1.BatchGetUsersRequest.ids": BATCH_GET_MAX,
    "userservice.v1.BatchCreateUsersRequest.users": BATCH_CREATE_MAX,
}
# google.protobuf.FieldMask paths name fields; the longest is "labels." and a 63-character key.
MAX_MASK_PATH_CHARS = 72
FIELD_MASK = "google.protobuf.FieldMask"

# Called with the refused request before the refusal is answered (Login records its audit row).
RefusalHook = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    repeated: bool
    max_chars: int
    max_entries: int
    # For message fields: the plan of the nested message; None for strings.
    nested: tuple[_Field, ...] | None


def _plan(descriptor: Any, depth: int = 0) -> tuple[_Field, ...]:
    """The string and message fields of `descriptor`, recursively (bounded depth)."""
    if depth > 8:
        return ()
    fields: list[_Field] = []
    max_chars = MAX_MASK_PATH_CHARS if descriptor.full_name == FIELD_MASK else MAX_STRING_CHARS
    for field in descriptor.fields:
        repeated = field.is_repeated
        max_entries = REPEATED_LIMITS.get(field.full_name, MAX_REPEATED)
        if field.type == FieldDescriptor.TYPE_STRING:
            fields.append(_Field(field.name, repeated, max_chars, max_entries, None))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                # labels (map<string, string>) and Struct's fields: the use cases bound them.
                continue
            nested = _plan(field.message_type, depth + 1)
            if nested or repeated:
                fields.append(_Field(field.name, repeated, max_chars, max_entries, nested))
    return tuple(fields)


def _check_string(value: str, path: str, limit: int, out: list[FieldViolation]) -> None:
    if len(value) > limit:
        out.append(FieldViolation(path, f"must be at most {limit} characters", "TOO_LONG"))
    # Tabs and line breaks around a value are whitespace that the use cases trim (a pasted
    # "ada@example.com\t"); inside a value they are control characters like the rest.
    elif CONTROL_CHARACTERS.search(value) and CONTROL_CHARACTERS.search(value.strip(EDGE_SPACE)):
        out.append(FieldViolation(path, "must not contain control characters", "CONTROL_CHARACTER"))


def _too_many(values: Any, field: _Field, path: str, out: list[FieldViolation]) -> bool:
    if len(values) <= field.max_entries:
        return False
    out.append(FieldViolation(path, f"must have at most {field.max_entries} entries", "TOO_MANY"))
    return True


def _walk(
    message: Message, plan: tuple[_Field, ...], prefix: str, out: list[FieldViolation]
) -> None:
    for field in plan:
        path = f"{prefix}{field.name}"
        if field.nested is None:
            if field.repeated:
                values = getattr(message, field.name)
                if _too_many(values, field, path, out):
                    continue
                for i, value in enumerate(values):
                    _check_string(value, f"{path}[{i}]", field.max_chars, out)
            else:
                _check_string(getattr(message, field.name), path, field.max_chars, out)
        elif field.repeated:
            items = getattr(message, field.name)
            if _too_many(items, field, path, out):
                continue
            for i, item in enumerate(items):
                _walk(item, field.nested, f"{path}[{i}].", out)
        elif message.HasField(field.name):
            _walk(getattr(message, field.name), field.nested, f"{path}.", out)


def violations_of(
    message: Message, plans: dict[str, tuple[_Field, ...]] | None = None
) -> list[FieldViolation]:
    """Every control character and over-long value in `message`, by field path."""
    descriptor = message.DESCRIPTOR
    plan = plans.get(descriptor.full_name) if plans is not None else None
    if plan is None:
        plan = _plan(descriptor)
        if plans is not None:
            plans[descriptor.full_name] = plan
    found: list[FieldViolation] = []
    _walk(message, plan, "", found)
    return found


class InputCheckInterceptor(UnaryWrappingInterceptor):
    def __init__(self, on_refused: Mapping[str, RefusalHook] | None = None) -> None:
        super().__init__()
        self._on_refused = dict(on_refused or {})
        self._plans: dict[str, tuple[_Field, ...]] = {}

    def wrap(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        plans = self._plans
        hook = self._on_refused.get(method)

        async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Message):
                found = violations_of(request, plans)
                if found:
                    if hook is not None:
                        await hook(request)
                    raise ValidationFailed(found)
            return await behavior(request, context)

        return checked

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        plans = self._plans

        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if isinstance(request, Message):
                found = violations_of(request, plans)
                if found:
                    raise ValidationFailed(found)

        return checked_first(behavior, check)
