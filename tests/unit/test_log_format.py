"""The JSON log line's timestamp, which the formatter reuses while a second lasts."""

from __future__ import annotations

import json
import logging

from usersvc.logs import JsonFormatter


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
