"""userservice.v1.UserService: maps requests to use cases and results to responses."""

from __future__ import annotations

from collections.abc import AsyncIterator

from userservice.v1 import user_service_pb2 as pb
from userservice.v1 import user_service_pb2_grpc as pb_grpc
from usersvc.context import current_principal, request_id_var
from usersvc.domain.auth import RequestContext
from usersvc.interceptors.base import Context
from usersvc.interceptors.errors import entry_status
from usersvc.servicers.mapping import (
    add_users,
    audit_event_to_proto,
    struct_to_dict,
    timestamp,
    user_event_to_proto,
    user_to_proto,
)
from usersvc.services.account_codes import AccountCodeService
from usersvc.services.audit import AuditService
from usersvc.services.user_events import FeedItem, UserEventFeed
from usersvc.services.user_import import NewUserEntry
from usersvc.services.users import UserService


def _request_context() -> RequestContext:
    """The caller and request id the interceptors established for this call."""
    return RequestContext(current_principal(), request_id=request_id_var.get())


class UserServicer(pb_grpc.UserServiceServicer):
    def __init__(
        self,
        users: UserService,
        audit: AuditService,
        feed: UserEventFeed,
        codes: AccountCodeService,
    ) -> None:
        self._users = users
        self._audit = audit
        self._feed = feed
        self._codes = codes

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        user = await self._users.create_user(
            ctx=_request_context(),
            email=request.email,
            name=request.name,
            password=request.password,
            request_id=request.request_id,
            labels=dict(request.labels),
            admin_metadata=struct_to_dict(request.admin_metadata),
            password_change_required=request.password_change_required,
        )
        return pb.CreateUserResponse(user=user_to_proto(user))

    async def BatchCreateUsers(
        self, request: pb.BatchCreateUsersRequest, context: Context
    ) -> pb.BatchCreateUsersResponse:
        outcomes = await self._users.batch_create_users(
            ctx=_request_context(),
            entries=[
                NewUserEntry(
                    email=e.email,
                    name=e.name,
                    password=e.password if e.WhichOneof("credential") == "password" else None,
                    password_hash=(
                        e.password_hash if e.WhichOneof("credential") == "password_hash" else None
                    ),
                    roles=list(e.roles),
                    labels=dict(e.labels),
                    admin_metadata=struct_to_dict(e.admin_metadata),
                    password_change_required=e.password_change_required,
                )
                for e in request.users
            ],
            all_or_nothing=request.all_or_nothing,
            request_id=request.request_id,
        )
        return pb.BatchCreateUsersResponse(
            results=[
                pb.BatchCreateUserResult(
                    status=entry_status(o.error),
                    user=user_to_proto(o.user) if o.user is not None else None,
                )
                for o in outcomes
            ]
        )

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        user = await self._users.get_user(request.id, ctx=_request_context())
        return pb.GetUserResponse(user=user_to_proto(user))

    async def BatchGetUsers(
        self, request: pb.BatchGetUsersRequest, context: Context
    ) -> pb.BatchGetUsersResponse:
        result = await self._users.batch_get_users(
            ctx=_request_context(),
            user_ids=list(request.ids),
            allow_missing=request.allow_missing,
        )
        response = pb.BatchGetUsersResponse(missing_ids=[str(u) for u in result.missing_ids])
        add_users(response.users, result.users)
        return response

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: Context
    ) -> pb.ListUsersResponse:
        result = await self._users.list_users(
            page_size=request.page_size,
            page_token=request.page_token,
            email=request.email,
            filter=request.filter,
            show_deleted=request.show_deleted,
            ctx=_request_context(),
        )
        response = pb.ListUsersResponse(
            next_page_token=result.next_page_token, total_size=result.total_size
        )
        add_users(response.users, result.users)
        return response

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        user = await self._users.update_user(
            ctx=_request_context(),
            user_id=request.user.id,
            paths=list(request.update_mask.paths),
            email=request.user.email,
            name=request.user.name,
            roles=list(request.user.roles),
            labels=dict(request.user.labels),
            admin_metadata=struct_to_dict(request.user.admin_metadata),
            etag=request.user.etag,
            password_change_required=request.user.password_change_required,
        )
        return pb.UpdateUserResponse(user=user_to_proto(user))

    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: Context
    ) -> pb.DeleteUserResponse:
        await self._users.delete_user(ctx=_request_context(), user_id=request.id, etag=request.etag)
        return pb.DeleteUserResponse()

    async def UndeleteUser(
        self, request: pb.UndeleteUserRequest, context: Context
    ) -> pb.UndeleteUserResponse:
        user = await self._users.undelete_user(
            ctx=_request_context(), user_id=request.id, etag=request.etag
        )
        return pb.UndeleteUserResponse(user=user_to_proto(user))

    async def ChangePassword(
        self, request: pb.ChangePasswordRequest, context: Context
    ) -> pb.ChangePasswordResponse:
        user = await self._users.change_password(
            ctx=_request_context(),
            user_id=request.id,
            current_password=request.current_password,
            new_password=request.new_password,
            etag=request.etag,
        )
        return pb.ChangePasswordResponse(user=user_to_proto(user))

    async def DisableUser(
        self, request: pb.DisableUserRequest, context: Context
    ) -> pb.DisableUserResponse:
        user = await self._users.disable_user(
            ctx=_request_context(), user_id=request.id, etag=request.etag
        )
        return pb.DisableUserResponse(user=user_to_proto(user))

    async def EnableUser(
        self, request: pb.EnableUserRequest, context: Context
    ) -> pb.EnableUserResponse:
        user = await self._users.enable_user(
            ctx=_request_context(), user_id=request.id, etag=request.etag
        )
        return pb.EnableUserResponse(user=user_to_proto(user))

    async def UnlockUser(
        self, request: pb.UnlockUserRequest, context: Context
    ) -> pb.UnlockUserResponse:
        user = await self._users.unlock_user(
            ctx=_request_context(), user_id=request.id, etag=request.etag
        )
        return pb.UnlockUserResponse(user=user_to_proto(user))

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        result = await self._audit.list_events(
            page_size=request.page_size, page_token=request.page_token, user_id=request.user_id
        )
        return pb.ListAuditEventsResponse(
            events=[audit_event_to_proto(e) for e in result.events],
            next_page_token=result.next_page_token,
        )

    async def WatchUserEvents(
        self, request: pb.WatchUserEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchUserEventsResponse]:
        # The messages go out through context.write, each bounded in time by the feed (a
        # message yielded to grpc would wait on a stalled consumer for ever); this stays an
        # async generator so the interceptors wrap it as the stream it is.
        headers_sent = False

        async def send(item: FeedItem) -> None:
            nonlocal headers_sent
            if not headers_sent:
                # Headers are not flow-controlled: sent apart, an abandoned first message
                # cannot leave them half-sent under the final status.
                await context.send_initial_metadata(())
                headers_sent = True
            response = pb.WatchUserEventsResponse(resume_token=item.resume_token)
            if item.event is not None:
                response.event.CopyFrom(user_event_to_proto(item.event.change))
            await context.write(response)

        await self._feed.deliver(request.after, send)
        return
        yield  # pragma: no cover - makes this an async generator

    async def SendVerificationEmail(
        self, request: pb.SendVerificationEmailRequest, context: Context
    ) -> pb.SendVerificationEmailResponse:
        expires = await self._codes.send_verification_email(
            ctx=_request_context(), user_id=request.user_id
        )
        return pb.SendVerificationEmailResponse(expire_time=timestamp(expires))

    async def VerifyEmail(
        self, request: pb.VerifyEmailRequest, context: Context
    ) -> pb.VerifyEmailResponse:
        # Public: no caller to name, the code is the proof.
        await self._codes.verify_email(
            request_id=request_id_var.get(), user_id=request.user_id, code=request.code
        )
        return pb.VerifyEmailResponse()

    async def CreateRecoveryCode(
        self, request: pb.CreateRecoveryCodeRequest, context: Context
    ) -> pb.CreateRecoveryCodeResponse:
        expires = await self._codes.create_recovery_code(
            ctx=_request_context(), user_id=request.user_id
        )
        return pb.CreateRecoveryCodeResponse(expire_time=timestamp(expires))

    async def RecoverPassword(
        self, request: pb.RecoverPasswordRequest, context: Context
    ) -> pb.RecoverPasswordResponse:
        # Public: no caller to name, the code is the proof.
        await self._codes.recover_password(
            request_id=request_id_var.get(),
            user_id=request.user_id,
            code=request.code,
            new_password=request.new_password,
        )
        return pb.RecoverPasswordResponse()
