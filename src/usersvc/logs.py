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
        entry = self.entry(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            getattr(record, "request_id", None),
        )
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key == "request_id":
                continue
            entry[key] = "[REDACTED]" if key in SENSITIVE_KEYS else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)

    def entry(
        self, created: float, level: str, logger: str, message: str, request_id: str | None
    ) -> dict[str, Any]:
        """The fields every line starts with, in their order."""
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "time": f"{self._second_text}.{int((created - second) * 1000):03d}Z",
            "level": level,
            "logger": logger,
            "message": message,
            "request_id": request_id or request_id_var.get(),
            "trace_id": None,
            "span_id": None,
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        return entry


class LineWriter:
    """Writes one logger's lines straight to the JSON handler `configure_logging` installed,
    without building a LogRecord or walking the logging machinery (a third of an access-log
    line's cost, and the access log writes a line per call).

    Used only while logging would hand the line to that handler and no other (no filters, no
    other handler on the way, the level enabled); otherwise, as under a test's log capture or
    another configuration, the line goes through `logging` as usual. Fields must be plain
    JSON values chosen by the caller: they are not checked against SENSITIVE_KEYS.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._chain: list[logging.Logger] = []
        node: logging.Logger | None = logger
        while node is not None:
            self._chain.append(node)
            node = node.parent

    def _direct_handler(self, level: int) -> logging.StreamHandler[Any] | None:
        handler = _json_handler
        if handler is None or not self._logger.isEnabledFor(level):
            return None
        for node in self._chain:
            if node.filters or node.disabled:
                return None
            if node.handlers:
                # The first logger with handlers must be the root, with ours alone.
                if node is not logging.root or node.handlers != [handler]:
                    return None
                break
            if not node.propagate:
                return None
        if handler.filters or level < handler.level:
            return None
        return handler

    def write(self, level: int, message: str, fields: dict[str, Any]) -> None:
        handler = self._direct_handler(level)
        formatter = handler.formatter if handler is not None else None
        if handler is None or not isinstance(formatter, JsonFormatter):
            self._logger.log(level, message, extra=fields)
            return
        entry = formatter.entry(
            time.time(), logging.getLevelName(level), self._logger.name, message, None
        )
        entry.update(fields)
        line = json.dumps(entry, default=str, ensure_ascii=False) + "\n"
        handler.acquire()
        try:
            handler.stream.write(line)
            handler.stream.flush()
        except Exception:
            handler.release()
            # Let logging report the failure its usual way.
            self._logger.log(level, message, extra=fields)
            return
        handler.release()


# The handler configure_logging installed (logging's configuration is process-wide anyway).
_json_handler: logging.StreamHandler[Any] | None = None


# Libraries that write statement parameters (password hashes, token hashes) at DEBUG: never
# below INFO, whatever USERSVC_LOG_LEVEL says.
PARAMETER_LOGGING_LIBRARIES = ("aiosqlite",)


def cap_library_loggers() -> None:
    for name in PARAMETER_LOGGING_LIBRARIES:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


# grpc decodes each metadata value as UTF-8; a value that is not, it logs whole at ERROR with a
# traceback before reading it as Latin-1. The caller chooses that value: "Bearer <token>" and
# one stray byte would put a working token in the log, three lines per call.
GRPC_METADATA_LOGGER = "grpc._cython.cygrpc"
GRPC_UNDECODABLE_VALUE = "Invalid encoding on %s"


class UndecodableMetadataFilter(logging.Filter):
    """Rewrites grpc's line about a non-UTF-8 metadata value: its size instead of the value,
    at WARNING (the caller's mistake, not the server's), without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == GRPC_UNDECODABLE_VALUE:
            value = record.args[0] if isinstance(record.args, tuple) and record.args else b""
            record.msg = "a metadata value is not UTF-8 (%d bytes); read as Latin-1"
            record.args = (len(value) if isinstance(value, bytes | str) else 0,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def redact_undecodable_metadata() -> None:
    """Install UndecodableMetadataFilter on grpc's logger (once per process)."""
    logger = logging.getLogger(GRPC_METADATA_LOGGER)
    if not any(isinstance(f, UndecodableMetadataFilter) for f in logger.filters):
        logger.addFilter(UndecodableMetadataFilter())


def configure_logging(level: str) -> None:
    """Send every log line to stderr as JSON."""
    global _json_handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    _json_handler = handler
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    cap_library_loggers()
    redact_undecodable_metadata()
    # No line shows the caller's source line, thread, process or task names: skip collecting
    # them for every record (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Alembic announces every plugin at INFO; its migration steps are still logged at WARNING+.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
