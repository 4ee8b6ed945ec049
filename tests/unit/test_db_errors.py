"""The database-error translator on its own: driver errors in, domain errors out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import exc

from usersvc.adapters.db_errors import SanitizedDatabaseError, raise_translated, translate_db_error
from usersvc.domain.errors import (
    DuplicateRequest,
    EmailTaken,
    RetryableConflict,
    StorageUnavailable,
)

SECRET_ROW = "Failing row contains (1, a@example.com, $argon2id$v=19$secret-hash)."


class DriverError(Exception):
    """Stands in for a psycopg or sqlite3 exception: text, and a SQLSTATE on PostgreSQL."""

    def __init__(self, text: str, sqlstate: str | None = None, diag: object = None) -> None:
        super().__init__(text)
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if diag is not None:
            self.diag = diag


@dataclass
class Diagnostics:
    message_primary: str
    constraint_name: str | None = None


def wrapped(
    cls: type[exc.DBAPIError], orig: Exception, *, invalidated: bool = False
) -> exc.DBAPIError:
    return cls("INSERT ...", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        (DriverError('duplicate key value violates "uq_users_email"', "23505"), EmailTaken),
        (DriverError("UNIQUE constraint failed: users.email"), EmailTaken),
        (
            DriverError('duplicate key value violates "pk_idempotency_keys"', "23505"),
            DuplicateRequest,
        ),
        (
            DriverError(
                "UNIQUE constraint failed: idempotency_keys.caller, idempotency_keys.request_id"
            ),
            DuplicateRequest,
        ),
    ],
)
def test_unique_violations_become_the_domain_error_of_their_constraint(
    orig: Exception, expected: type[Exception]
) -> None:
    assert isinstance(translate_db_error(wrapped(exc.IntegrityError, orig)), expected)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_serialization_failures_and_deadlocks_may_be_retried(sqlstate: str) -> None:
    err = wrapped(exc.OperationalError, DriverError("could not serialize", sqlstate))
    assert isinstance(translate_db_error(err), RetryableConflict)


def test_a_locked_sqlite_database_may_be_retried() -> None:
    err = wrapped(exc.OperationalError, DriverError("database is locked"))
    assert isinstance(translate_db_error(err), RetryableConflict)


@pytest.mark.parametrize("sqlstate", ["08006", "08001", "57P01", "53300"])
def test_connection_shutdown_and_resource_errors_mean_unavailable(sqlstate: str) -> None:
    err = wrapped(exc.OperationalError, DriverError("server closed the connection", sqlstate))
    assert isinstance(translate_db_error(err), StorageUnavailable)


def test_an_invalidated_connection_means_unavailable() -> None:
    err = wrapped(exc.DBAPIError, DriverError("connection lost"), invalidated=True)
    assert isinstance(translate_db_error(err), StorageUnavailable)


@pytest.mark.parametrize("err", [TimeoutError(), ConnectionRefusedError(), OSError("no route")])
def test_network_errors_mean_unavailable(err: Exception) -> None:
    assert isinstance(translate_db_error(err), StorageUnavailable)


def test_no_pooled_connection_free_within_the_pool_timeout_means_unavailable() -> None:
    """While the database hangs, calls without a deadline hold every pooled connection; the
    next ones give up waiting for one after the pool timeout. That is the database being
    unavailable (UNAVAILABLE, retry later), not an internal error."""
    err = exc.TimeoutError("QueuePool limit of size 2 overflow 0 reached, connection timed out")
    assert isinstance(translate_db_error(err), StorageUnavailable)


def test_other_database_errors_lose_the_row_but_keep_sqlstate_and_constraint() -> None:
    diag = Diagnostics('new row violates check constraint "ck_users_state"', "ck_users_state")
    orig = DriverError(f"{diag.message_primary}\nDETAIL:  {SECRET_ROW}", "23514", diag)
    translated = translate_db_error(wrapped(exc.IntegrityError, orig))
    assert isinstance(translated, SanitizedDatabaseError)
    text = str(translated)
    assert "secret-hash" not in text
    assert "Failing row" not in text
    assert "sqlstate=23514" in text
    assert "constraint=ck_users_state" in text
    assert "DriverError" in text


def test_a_database_error_without_diagnostics_keeps_its_first_line_only() -> None:
    orig = DriverError(f"syntax error at or near\nDETAIL: {SECRET_ROW}", "42601")
    translated = translate_db_error(wrapped(exc.ProgrammingError, orig))
    assert isinstance(translated, SanitizedDatabaseError)
    assert "secret-hash" not in str(translated)
    assert "syntax error at or near" in str(translated)


def test_errors_that_are_not_the_database_s_pass_through_unchanged() -> None:
    err = ValueError("a bug")
    assert translate_db_error(err) is err
    raise_translated(err)  # returns: the caller re-raises the original


def test_a_translated_error_is_raised_from_the_original() -> None:
    original = wrapped(exc.IntegrityError, DriverError("UNIQUE constraint failed: users.email"))
    with pytest.raises(EmailTaken) as raised:
        raise_translated(original)
    assert raised.value.__cause__ is original


def test_a_sanitized_error_hides_the_original_from_tracebacks() -> None:
    orig = DriverError(f"boom\nDETAIL: {SECRET_ROW}", "XX000")
    with pytest.raises(SanitizedDatabaseError) as raised:
        raise_translated(wrapped(exc.InternalError, orig))
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
