"""Decode the error details that buf curl prints as base64.

buf curl writes a failed call to standard error as JSON, each google.rpc detail as
``{"type": "google.rpc.BadRequest", "value": "<base64>"}``. This reads that JSON from standard
input and prints it with every known detail decoded::

    buf curl ... 2>&1 >/dev/null | python -m userservice.client.details
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from typing import Any

from google.protobuf import descriptor_pool, json_format, message_factory

# Imported for its side effect: google.rpc's detail types become known by name.
from google.rpc import error_details_pb2  # noqa: F401


def _b64decode(value: str) -> bytes:
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error:
        return base64.urlsafe_b64decode(padded)


def decode_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """One ``{"type", "value"}`` detail as ``{"type", ...fields}``; unknown types stay as is."""
    type_name = str(detail.get("type", ""))
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return detail
    message = message_factory.GetMessageClass(descriptor)()
    message.ParseFromString(_b64decode(str(detail.get("value", ""))))
    return {"type": type_name, **json_format.MessageToDict(message)}


def decode_error(error: dict[str, Any]) -> dict[str, Any]:
    """buf curl's error JSON with its details decoded."""
    return {**error, "details": [decode_detail(d) for d in error.get("details", [])]}


def main() -> int:
    text = sys.stdin.read()
    start = text.find("{")
    if start < 0:
        print(text, end="")
        return 1
    error, _ = json.JSONDecoder().raw_decode(text[start:])
    print(json.dumps(decode_error(error), indent=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
