"""Per-request values, set by interceptors and read anywhere below them."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from usersvc.domain.auth import Principal

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
principal_var: ContextVar[Principal | None] = ContextVar("principal", default=None)
# When the caller stops waiting, as a time.monotonic() value; None: no deadline.
deadline_var: ContextVar[float | None] = ContextVar("deadline", default=None)


@dataclass(slots=True)
class CallRecord:
    """What inner interceptors learn about a call for the outer ones (the access log)."""

    principal: Principal | None = None


call_record_var: ContextVar[CallRecord | None] = ContextVar("call_record", default=None)


def current_principal() -> Principal:
    """The authenticated caller; only methods behind the auth interceptor may ask."""
    principal = principal_var.get()
    if principal is None:
        raise RuntimeError("no authenticated caller in this context")
    return principal
