"""Domain errors. The error interceptor maps each class to a status code in one table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path and why it is bad."""

    field: str
    description: str
    reason: str = "INVALID_FIELD"


class DomainError(Exception):
    """Base of every error the service layer raises on purpose."""

    reason: str = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class ValidationFailed(DomainError):
    """One or more request fields are invalid; every violation is listed."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        # The first few fields only: the message must stay short whatever the request held.
        fields = ", ".join(dict.fromkeys(v.field[:64] for v in violations[:5]))
        more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
        super().__init__(f"invalid request: {fields}{more}", reason=reason)
        self.violations = violations


class InvalidCode(ValidationFailed):
    """A one-time code that does not work, for whatever reason: wrong, expired, used,
    superseded, someone else's, or for a user that does not exist. One answer for all, so
    that it tells nothing about which."""

    reason = "INVALID_CODE"

    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("code", "the code is wrong, expired or already used", "INVALID_CODE")]
        )


class NotFound(DomainError):
    reason = "NOT_FOUND"


class UserNotFound(NotFound):
    reason = "USER_NOT_FOUND"

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id} not found")


class UsersNotFound(NotFound):
    """Some ids of a batch matched no user; the first `limit` are named, the rest counted."""

    reason = "USER_NOT_FOUND"

    def __init__(self, user_ids: list[str], *, limit: int) -> None:
        named = ", ".join(user_ids[:limit])
        more = f" and {len(user_ids) - limit} more" if len(user_ids) > limit else ""
        super().__init__(f"users not found: {named}{more}")
        self.user_ids = user_ids


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class EmailTaken(AlreadyExists):
    reason = "EMAIL_TAKEN"

    def __init__(self) -> None:
        super().__init__("a user with this email already exists")


class EmailLookalike(AlreadyExists):
    reason = "EMAIL_CONFUSABLE"

    def __init__(self) -> None:
        super().__init__(
            "a user with an email address that looks the same (Unicode confusable) already exists"
        )


class EtagMismatch(DomainError):
    reason = "ETAG_MISMATCH"

    def __init__(self) -> None:
        super().__init__(
            "the etag does not match the current version of the resource; read it again and "
            'send its etag exactly as returned, quotes included (such as "3")'
        )


class BatchAborted(DomainError):
    """An entry of an all-or-nothing batch that was fine itself: another entry failed, so
    nothing was written."""

    reason = "BATCH_ABORTED"

    def __init__(self, message: str = "not created: another entry of the batch failed") -> None:
        super().__init__(message)


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class ConcurrencyConflict(DomainError):
    """A transaction kept conflicting with others after bounded retries."""

    reason = "CONCURRENT_MODIFICATION"


class RetryableConflict(ConcurrencyConflict):
    """Serialization failure or deadlock: the unit of work may be run again."""

    reason = "TRANSACTION_CONFLICT"


class DuplicateRequest(DomainError):
    """A create with this (caller, request_id) was committed concurrently; read its result."""

    reason = "DUPLICATE_REQUEST"

    def __init__(self) -> None:
        super().__init__("request already processed")


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"

    def __init__(self, message: str = "missing, invalid or expired credentials") -> None:
        super().__init__(message)


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"

    def __init__(self, message: str = "the caller is not allowed to do this") -> None:
        super().__init__(message)


class PasswordChangeRequired(PermissionDenied):
    """The caller's token says its user must change the password before anything else."""

    reason = "PASSWORD_CHANGE_REQUIRED"

    def __init__(self) -> None:
        super().__init__(
            "the password must be changed first: only ChangePassword is allowed with this token"
        )


class ResourceExhausted(DomainError):
    """Too many calls (rate limits); retry after `retry_after_seconds`."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class StorageUnavailable(DomainError):
    reason = "STORAGE_UNAVAILABLE"

    def __init__(self, message: str = "the database is unavailable; retry later") -> None:
        super().__init__(message)


class Overloaded(ResourceExhausted):
    """Too much of one kind of work is queued already; a retry after `retry_after` s may pass."""

    reason = "OVERLOADED"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after_seconds=retry_after)
        self.retry_after = retry_after


class InvalidPageToken(ValueError):
    """Garbage, tampered, expired, or issued for another query."""


class InvalidAccessToken(Exception):
    """Any reason a token is refused; the reason is for the server log only."""


class ShuttingDown(StorageUnavailable):
    """This replica is stopping; another one (or this one, restarted) will answer."""

    reason = "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica")


class DeadlineExceeded(DomainError):
    """The caller's deadline ran out while the database was still working; rolled back."""

    reason = "DEADLINE_EXCEEDED"

    def __init__(self) -> None:
        super().__init__("deadline exceeded")


class InvalidResumeToken(ValueError):
    """A WatchUserEvents resume token that is garbage or was tampered with."""


class ResumeTokenExpired(FailedPrecondition):
    """The events after this resume position were purged: the consumer must resynchronise."""

    reason = "RESUME_TOKEN_EXPIRED"

    def __init__(self) -> None:
        super().__init__(
            "events after this resume token were purged (retention period); resynchronise"
            " and watch from now"
        )


class StreamEnded(DomainError):
    """A stream ended early; `resume_token` continues it (on any replica)."""

    def __init__(self, message: str, *, resume_token: str) -> None:
        # Directly: the other base of each subclass takes other arguments.
        DomainError.__init__(self, message)
        self.resume_token = resume_token


class StreamShutDown(StreamEnded, ShuttingDown):
    """This replica is stopping: resume elsewhere from `resume_token`."""

    reason = "SHUTTING_DOWN"

    def __init__(self, *, resume_token: str) -> None:
        StreamEnded.__init__(
            self,
            "the server is shutting down; resume from resume_token on another replica",
            resume_token=resume_token,
        )


class ConsumerTooSlow(StreamEnded, ResourceExhausted):
    """The caller read the stream too slowly; it may resume from `resume_token`."""

    reason = "CONSUMER_TOO_SLOW"

    def __init__(self, *, resume_token: str) -> None:
        StreamEnded.__init__(
            self,
            "the stream was read too slowly; resume from resume_token",
            resume_token=resume_token,
        )
        self.retry_after_seconds = None
