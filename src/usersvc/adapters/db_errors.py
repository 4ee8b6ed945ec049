"""Database errors the service layer can act on, as domain errors; the rest without row data."""

from __future__ import annotations

import logging

from sqlalchemy import exc

from usersvc.domain.errors import (
    DeadlineExceeded,
    DuplicateRequest,
    EmailLookalike,
    EmailTaken,
    RetryableConflict,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

# Serialization failure and deadlock: the transaction may succeed if run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# Raised by statement_timeout, which the caller's deadline sets (see SqlUnitOfWork).
QUERY_CANCELED = "57014"


def _is_unique_violation(err: exc.IntegrityError) -> bool:
    orig = err.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return bool(sqlstate == "23505")
    return "UNIQUE constraint failed" in str(orig)


def translate_db_error(err: BaseException) -> BaseException:
    """Map driver errors the caller can act on to domain errors; leave the rest alone."""
    if isinstance(err, exc.IntegrityError) and _is_unique_violation(err):
        text = str(err.orig)
        if "idempotency_keys" in text:
            return DuplicateRequest()
        if "email_skeleton" in text:
            return EmailLookalike()
        if "email" in text:
            return EmailTaken()
    sqlstate = getattr(getattr(err, "orig", None), "sqlstate", None)
    if sqlstate == QUERY_CANCELED:
        return DeadlineExceeded()
    if sqlstate in RETRYABLE_SQLSTATES:
        return RetryableConflict(f"transaction conflict ({sqlstate})")
    if isinstance(err, exc.OperationalError) and "database is locked" in str(err.orig):
        return RetryableConflict("database is locked")
    if isinstance(err, exc.InterfaceError | exc.OperationalError) or (
        isinstance(err, exc.DBAPIError) and err.connection_invalidated
    ):
        sqlstate = getattr(err.orig, "sqlstate", None) or ""
        # Class 08 (connection), 57P (shutdown), 53 (insufficient resources) are transient.
        if not sqlstate or sqlstate.startswith(("08", "57P", "53")):
            log.warning("database unavailable: %s", type(err.orig).__name__)
            return StorageUnavailable()
    if isinstance(err, exc.TimeoutError):
        # No pooled connection came free within the pool's timeout: every one is busy with a
        # statement the database does not answer (a hang) or is slow to.
        log.warning("database unavailable: no pooled connection free in time")
        return StorageUnavailable()
    if isinstance(err, TimeoutError | OSError | ConnectionError):
        return StorageUnavailable()
    if isinstance(err, exc.DBAPIError):
        return SanitizedDatabaseError.of(err)
    return err


class SanitizedDatabaseError(Exception):
    """An unexpected database error without the server's detail text.

    PostgreSQL's DETAIL repeats the failing row ("Failing row contains (...)"), which may hold
    a password hash; only the primary message, the SQLSTATE and the constraint are kept.
    """

    @classmethod
    def of(cls, err: exc.DBAPIError) -> SanitizedDatabaseError:
        orig = err.orig
        diag = getattr(orig, "diag", None)
        primary = getattr(diag, "message_primary", None) or str(orig).split("\n", 1)[0]
        if diag is None and "Failing row" in primary:  # pragma: no cover - defensive
            primary = primary.split("Failing row", 1)[0]
        parts = [type(orig).__name__, f"sqlstate={getattr(orig, 'sqlstate', None) or '-'}"]
        constraint = getattr(diag, "constraint_name", None)
        if constraint:
            parts.append(f"constraint={constraint}")
        return cls(f"{' '.join(parts)}: {primary}")


def raise_translated(err: BaseException) -> None:
    """Raise the error `err` stands for; return when it stands for itself (the caller then
    re-raises the original)."""
    translated = translate_db_error(err)
    if translated is err:
        return
    if isinstance(translated, SanitizedDatabaseError):
        # "from None": the original text must not reach a traceback in the log.
        raise translated from None
    raise translated from err
