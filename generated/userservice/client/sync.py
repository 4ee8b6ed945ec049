"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from userservice.client import _channel
from userservice.client._requests import (
    TokenSource,
    batch_create_users_request,
    call_metadata,
    create_user_request,
    update_user_request,
)
from userservice.client.errors import ApiError, Unavailable
from userservice.client.results import BatchCreateResult, batch_create_results
from userservice.client.watch import UserEventStream
from userservice.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
)

Response = TypeVar("Response", bound=Message)


class Client:
    """UserService and AuthService over one channel.

    ``Client("usersvc:50051", token=lambda: tokens.access_token)``. Every call sends the token
    (if ``token`` returns one) and a new ``x-request-id``, has a deadline of ``timeout`` seconds
    unless the call says otherwise, and raises an ``ApiError`` subclass on failure. Calls that
    change nothing are retried on UNAVAILABLE (at most 4 attempts, exponential backoff);
    CreateUser and BatchCreateUsers too, always with a request_id; nothing else is.
    """

    def __init__(
        self,
        target: str,
        *,
        token: TokenSource | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = _channel.DEFAULT_TIMEOUT_SECONDS,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        opts = _channel.channel_options(timeout, options)
        self.channel: grpc.Channel = (
            grpc.secure_channel(target, credentials, opts)
            if credentials is not None
            else grpc.insecure_channel(target, opts)
        )
        self.token = token
        self.timeout = timeout
        self._users = user_service_pb2_grpc.UserServiceStub(self.channel)
        self._auth = auth_service_pb2_grpc.AuthServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self,
        method: Callable[..., Response],
        request: Message,
        *,
        timeout: float | None,
    ) -> Response:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=call_metadata(self.token),
            )
        except grpc.RpcError as err:
            raise ApiError.from_rpc_error(err) from err

    def _call_keyed(
        self,
        method: Callable[..., Response],
        request: Message,
        *,
        timeout: float | None,
    ) -> Response:
        """A call whose request_id makes a repeat harmless, retried on UNAVAILABLE as the
        channel retries reads (a service config cannot see the request_id)."""
        attempt = 1
        while True:
            try:
                return self._call(method, request, timeout=timeout)
            except Unavailable as err:
                if attempt >= _channel.MAX_ATTEMPTS:
                    raise
                time.sleep(_channel.backoff_seconds(attempt, err.retry_delay))
                attempt += 1

    # AuthService

    def login(
        self, email: str, password: str, *, timeout: float | None = None
    ) -> auth_service_pb2.TokenPair:
        request = auth_service_pb2.LoginRequest(email=email, password=password)
        return self._call(self._auth.Login, request, timeout=timeout).tokens

    def refresh_token(
        self, refresh_token: str, *, timeout: float | None = None
    ) -> auth_service_pb2.TokenPair:
        request = auth_service_pb2.RefreshTokenRequest(refresh_token=refresh_token)
        return self._call(self._auth.RefreshToken, request, timeout=timeout).tokens

    def logout(self, refresh_token: str, *, timeout: float | None = None) -> None:
        request = auth_service_pb2.LogoutRequest(refresh_token=refresh_token)
        self._call(self._auth.Logout, request, timeout=timeout)

    def get_jwks(self, *, timeout: float | None = None) -> auth_service_pb2.GetJwksResponse:
        request = auth_service_pb2.GetJwksRequest()
        return self._call(self._auth.GetJwks, request, timeout=timeout)

    # UserService

    def create_user(
        self,
        *,
        email: str,
        name: str,
        password: str,
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        admin_metadata: Mapping[str, Any] | None = None,
        password_change_required: bool = False,
        timeout: float | None = None,
    ) -> user_pb2.User:
        """Creates a user. Without ``request_id`` one is made, so a retry creates nothing twice.
        ``labels`` (see User.labels) and ``admin_metadata`` (a JSON object, admins only) are
        optional; ``password_change_required`` (admins only) makes the user change its
        password before anything else."""
        request = create_user_request(
            email,
            name,
            password,
            request_id,
            labels=labels,
            admin_metadata=admin_metadata,
            password_change_required=password_change_required,
        )
        return self._call_keyed(self._users.CreateUser, request, timeout=timeout).user

    def batch_create_users(
        self,
        users: Sequence[user_service_pb2.BatchCreateUserEntry],
        *,
        all_or_nothing: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> list[BatchCreateResult]:
        """Creates up to 1,000 users (admins only); each entry has a ``password`` or an
        imported ``password_hash``. Returns one result per entry, in order: its ``user``, or
        its ``error`` (an ``ApiError``, not raised: the other entries still count). With
        ``all_or_nothing`` nothing is written if any entry fails. Without ``request_id`` one
        is made, so a retry creates nothing twice. Raises only for the call as a whole (no
        entries or too many, not admin, ...)."""
        request = batch_create_users_request(users, all_or_nothing, request_id)
        response = self._call_keyed(self._users.BatchCreateUsers, request, timeout=timeout)
        return batch_create_results(response)

    def get_user(self, id: str, *, timeout: float | None = None) -> user_pb2.User:
        request = user_service_pb2.GetUserRequest(id=id)
        return self._call(self._users.GetUser, request, timeout=timeout).user

    def batch_get_users(
        self,
        ids: Sequence[str],
        *,
        allow_missing: bool = False,
        timeout: float | None = None,
    ) -> user_service_pb2.BatchGetUsersResponse:
        """Up to 1,000 users in one call: ``.users`` in the order of ``ids``, duplicates
        included. An unknown id raises ``NotFound``, unless ``allow_missing``: then it is left
        out of ``.users`` and listed in ``.missing_ids``."""
        request = user_service_pb2.BatchGetUsersRequest(ids=list(ids), allow_missing=allow_missing)
        return self._call(self._users.BatchGetUsers, request, timeout=timeout)

    def list_users(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        email: str = "",
        filter: str = "",
        timeout: float | None = None,
    ) -> user_service_pb2.ListUsersResponse:
        """One page; ``filter`` is ListUsersRequest.filter, such as
        ``'labels.team = "billing" AND state = ACTIVE'``."""
        request = user_service_pb2.ListUsersRequest(
            page_size=page_size, page_token=page_token, email=email, filter=filter
        )
        return self._call(self._users.ListUsers, request, timeout=timeout)

    def iter_users(
        self,
        *,
        page_size: int = 0,
        email: str = "",
        filter: str = "",
        timeout: float | None = None,
    ) -> Iterator[user_pb2.User]:
        """Every matching user, newest first, fetching pages of ``page_size`` as needed."""
        token = ""
        while True:
            page = self.list_users(
                page_size=page_size, page_token=token, email=email, filter=filter, timeout=timeout
            )
            yield from page.users
            token = page.next_page_token
            if not token:
                return

    def update_user(
        self, user: user_pb2.User, paths: Sequence[str], *, timeout: float | None = None
    ) -> user_pb2.User:
        """Writes the fields of ``user`` named in ``paths`` (such as ``"name"``, ``"labels"``,
        ``"password_change_required"``; see UpdateUserRequest.update_mask); conditional when
        ``user.etag`` is set (pass the etag exactly as a read returned it)."""
        request = update_user_request(user, paths)
        return self._call(self._users.UpdateUser, request, timeout=timeout).user

    def delete_user(self, id: str, *, etag: str = "", timeout: float | None = None) -> None:
        request = user_service_pb2.DeleteUserRequest(id=id, etag=etag)
        self._call(self._users.DeleteUser, request, timeout=timeout)

    def undelete_user(
        self, id: str, *, etag: str = "", timeout: float | None = None
    ) -> user_pb2.User:
        """Restores a soft-deleted user to the state it had when deleted."""
        request = user_service_pb2.UndeleteUserRequest(id=id, etag=etag)
        return self._call(self._users.UndeleteUser, request, timeout=timeout).user

    def change_password(
        self,
        id: str,
        *,
        new_password: str,
        current_password: str = "",
        etag: str = "",
        timeout: float | None = None,
    ) -> user_pb2.User:
        request = user_service_pb2.ChangePasswordRequest(
            id=id, new_password=new_password, current_password=current_password, etag=etag
        )
        return self._call(self._users.ChangePassword, request, timeout=timeout).user

    def send_verification_email(self, user_id: str, *, timeout: float | None = None) -> datetime:
        """Mails the user a new e-mail verification code; returns when the code expires (UTC).
        An e-mail that is verified already raises ``FailedPrecondition``
        (reason ``EMAIL_ALREADY_VERIFIED``)."""
        request = user_service_pb2.SendVerificationEmailRequest(user_id=user_id)
        response = self._call(self._users.SendVerificationEmail, request, timeout=timeout)
        return response.expire_time.ToDatetime(tzinfo=UTC)

    def verify_email(self, user_id: str, code: str, *, timeout: float | None = None) -> None:
        """Redeems the code of a verification mail (needs no token); read the user to see
        ``email_verified``. Any bad code raises ``InvalidArgument`` (reason ``INVALID_CODE``)."""
        request = user_service_pb2.VerifyEmailRequest(user_id=user_id, code=code)
        self._call(self._users.VerifyEmail, request, timeout=timeout)

    def create_recovery_code(self, user_id: str, *, timeout: float | None = None) -> datetime:
        """Mails the user a password recovery code (admins only); returns when it expires
        (UTC). The code itself goes by mail only."""
        request = user_service_pb2.CreateRecoveryCodeRequest(user_id=user_id)
        response = self._call(self._users.CreateRecoveryCode, request, timeout=timeout)
        return response.expire_time.ToDatetime(tzinfo=UTC)

    def recover_password(
        self, user_id: str, code: str, *, new_password: str, timeout: float | None = None
    ) -> None:
        """Sets a new password with the code of a recovery mail (needs no token); the user's
        tokens are revoked. Any bad code raises ``InvalidArgument`` (reason ``INVALID_CODE``)."""
        request = user_service_pb2.RecoverPasswordRequest(
            user_id=user_id, code=code, new_password=new_password
        )
        self._call(self._users.RecoverPassword, request, timeout=timeout)

    def disable_user(
        self, id: str, *, etag: str = "", timeout: float | None = None
    ) -> user_pb2.User:
        request = user_service_pb2.DisableUserRequest(id=id, etag=etag)
        return self._call(self._users.DisableUser, request, timeout=timeout).user

    def enable_user(
        self, id: str, *, etag: str = "", timeout: float | None = None
    ) -> user_pb2.User:
        request = user_service_pb2.EnableUserRequest(id=id, etag=etag)
        return self._call(self._users.EnableUser, request, timeout=timeout).user

    def unlock_user(
        self, id: str, *, etag: str = "", timeout: float | None = None
    ) -> user_pb2.User:
        """Clear the user's login lock and failure counter (admins)."""
        request = user_service_pb2.UnlockUserRequest(id=id, etag=etag)
        return self._call(self._users.UnlockUser, request, timeout=timeout).user

    def list_audit_events(
        self,
        *,
        user_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> user_service_pb2.ListAuditEventsResponse:
        request = user_service_pb2.ListAuditEventsRequest(
            user_id=user_id, page_size=page_size, page_token=page_token
        )
        return self._call(self._users.ListAuditEvents, request, timeout=timeout)

    def iter_audit_events(
        self, *, user_id: str = "", page_size: int = 0, timeout: float | None = None
    ) -> Iterator[user_pb2.AuditEvent]:
        """Every audit event (of ``user_id``, if set), newest first, page by page."""
        token = ""
        while True:
            page = self.list_audit_events(
                user_id=user_id, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.events
            token = page.next_page_token
            if not token:
                return

    def watch_user_events(
        self, after: str = "", *, timeout: float | None = None
    ) -> UserEventStream:
        """The change feed of users after the resume token ``after`` (empty: from now).

        Returns once the stream's first message (a checkpoint) arrived, so every change
        committed from then on comes. No deadline unless ``timeout`` is given; the stream
        stays open until cancelled. ``InvalidArgument`` for a bad token, ``FailedPrecondition``
        (RESUME_TOKEN_EXPIRED) for a purged position.
        """
        call = self._users.WatchUserEvents(
            user_service_pb2.WatchUserEventsRequest(after=after),
            timeout=timeout,
            metadata=call_metadata(self.token),
        )
        try:
            first = next(call)
        except grpc.RpcError as err:
            raise ApiError.from_rpc_error(err) from err
        return UserEventStream(call, first)
