"""JSON-lines logging: UTC timestamps and the request id on every line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

from usersvc.context import request_id_var
from usersvc.domain.audit import REDACTED_FIELDS

# Attributes every LogRecord has; anything else passed through `extra=` is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Never written, whatever a caller passes in `extra=`: the audit redaction list and more.
SENSITIVE_KEYS = REDACTED_FIELDS | {"authorization", "secret"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    # The timestamp up to the second, kept while the second lasts: strftime per line was a
    # visible part of an access-log line's cost.
    _second = -1
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "time": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "trace_id": None,
            "span_id": None,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key == "request_id":
                continue
            entry[key] = "[REDACTED]" if key in SENSITIVE_KEYS else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# Libraries that write statement parameters (password hashes, token hashes) at DEBUG: never
# below INFO, whatever USERSVC_LOG_LEVEL says.
PARAMETER_LOGGING_LIBRARIES = ("aiosqlite",)


def cap_library_loggers() -> None:
    for name in PARAMETER_LOGGING_LIBRARIES:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def configure_logging(level: str) -> None:
    """Send every log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    cap_library_loggers()
    # No line shows the caller's source line, thread, process or task names: skip collecting
    # them for every record (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Alembic announces every plugin at INFO; its migration steps are still logged at WARNING+.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
