"""The JSON log line: its timestamp (reused while a second lasts), and the access log's direct
writes, which must match what logging writes."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from usersvc import logs
from usersvc.context import request_id_var
from usersvc.logs import JsonFormatter, LineWriter, configure_logging


def _line(formatter: JsonFormatter, created: float) -> dict[str, object]:
    record = logging.LogRecord("usersvc.access", logging.INFO, __file__, 1, "rpc", None, None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    parsed: dict[str, object] = json.loads(formatter.format(record))
    return parsed


def test_each_line_has_its_own_utc_time_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    # Same second twice, the next second, an earlier one, then the first again.
    times = [1795000000.125, 1795000000.5, 1795000001.25, 1700000000.0, 1795000000.0]
    assert [_line(formatter, t)["time"] for t in times] == [
        "2026-11-18T11:06:40.125Z",
        "2026-11-18T11:06:40.500Z",
        "2026-11-18T11:06:41.250Z",
        "2023-11-14T22:13:20.000Z",
        "2026-11-18T11:06:40.000Z",
    ]


@pytest.fixture
def installed() -> Iterator[io.StringIO]:
    """configure_logging's JSON handler on the root logger, writing into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("INFO")
    out = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)


FIELDS = {"method": "/userservice.v1.UserService/GetUser", "code": "OK", "pid": 7, "roles": []}


def test_a_direct_line_is_the_line_logging_would_write(
    installed: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = logging.getLogger("usersvc.access")
    token = request_id_var.set("req-1")
    try:
        with monkeypatch.context() as patch:
            # As in the server: the JSON handler alone (pytest adds its capture handlers).
            patch.setattr(logging.root, "handlers", [logs._json_handler])
            patch.setattr(logger, "log", None)  # the direct path must not fall back to it
            LineWriter(logger).write(logging.INFO, "rpc", dict(FIELDS))
        logger.info("rpc", extra=dict(FIELDS))
    finally:
        request_id_var.reset(token)
    direct, logged = (json.loads(line) for line in installed.getvalue().splitlines())
    assert list(direct) == list(logged)  # the same fields in the same order
    direct.pop("time"), logged.pop("time")
    assert direct == logged
    assert direct["request_id"] == "req-1" and direct["method"] == FIELDS["method"]


def test_lines_go_through_logging_when_another_handler_listens(
    installed: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="usersvc.access"):
        LineWriter(logging.getLogger("usersvc.access")).write(logging.INFO, "rpc", dict(FIELDS))
    assert [r.getMessage() for r in caplog.records] == ["rpc"]
    assert getattr(caplog.records[0], "method", None) == FIELDS["method"]
    assert json.loads(installed.getvalue())["code"] == "OK"  # and the JSON handler still gets it


def test_a_disabled_level_writes_nothing(installed: io.StringIO) -> None:
    LineWriter(logging.getLogger("usersvc.access")).write(logging.DEBUG, "rpc", dict(FIELDS))
    assert installed.getvalue() == ""
