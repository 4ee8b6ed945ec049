"""Decoding buf curl's base64 error details, as the README shows."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

from google.rpc import error_details_pb2

from userservice.client.details import decode_error


def _b64(message: error_details_pb2.BadRequest | error_details_pb2.ErrorInfo) -> str:
    # buf curl prints standard base64 without padding.
    return base64.b64encode(message.SerializeToString()).decode().rstrip("=")


ERROR = {
    "code": "invalid_argument",
    "message": "invalid request: email",
    "details": [
        {"type": "google.rpc.ErrorInfo", "value": _b64(error_details_pb2.ErrorInfo(reason="R"))},
        {
            "type": "google.rpc.BadRequest",
            "value": _b64(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="email", description="d")
                    ]
                )
            ),
        },
        {"type": "example.Unknown", "value": "AAAA"},
    ],
}


def test_known_details_are_decoded_and_unknown_ones_kept() -> None:
    decoded = decode_error(ERROR)
    assert decoded["details"] == [
        {"type": "google.rpc.ErrorInfo", "reason": "R"},
        {
            "type": "google.rpc.BadRequest",
            "fieldViolations": [{"field": "email", "description": "d"}],
        },
        {"type": "example.Unknown", "value": "AAAA"},
    ]


def test_the_command_reads_buf_curl_output_from_stdin() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "userservice.client.details"],
        input=json.dumps(ERROR, indent=3),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["details"][0] == {
        "type": "google.rpc.ErrorInfo",
        "reason": "R",
    }
