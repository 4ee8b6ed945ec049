"""Authentication and per-method authorization, from policies declared in the contract.

Each method's `(userservice.v1.access_policy)` option is read from the descriptors once, at
start-up. A method without a policy is denied to everyone (default deny).
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.descriptor import FileDescriptor

from userservice.v1 import options_pb2
from usersvc.context import call_record_var, principal_var
from usersvc.domain.auth import Principal
from usersvc.domain.errors import PasswordChangeRequired, PermissionDenied
from usersvc.interceptors.base import (
    Context,
    StreamBehavior,
    UnaryBehavior,
    UnaryWrappingInterceptor,
    rebuild,
    rebuild_stream,
)
from usersvc.services.auth import Authenticator

# Infrastructure services whose protos we do not own; public so probes and tools work.
PUBLIC_INFRASTRUCTURE = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    public: bool
    roles: frozenset[str]
    self_field: tuple[str, ...]


PUBLIC = MethodPolicy(public=True, roles=frozenset(), self_field=())
# The only methods a token with "pcr" (the user must change its password) may call; public
# methods (RefreshToken, Logout, ...) need no token and are not affected.
PASSWORD_CHANGE_METHODS = frozenset({"/userservice.v1.UserService/ChangePassword"})


# An open stream checks its caller's token again this often: a revoked or expired token ends
# it within this plus the token-state cache's lifetime (at most 5 s).
STREAM_RECHECK_SECONDS = 0.5


def policies_from(files: Iterable[FileDescriptor]) -> dict[str, MethodPolicy]:
    """Every method's declared policy, keyed by its full path "/pkg.Service/Method"."""
    found = dict.fromkeys(PUBLIC_INFRASTRUCTURE, PUBLIC)
    for file in files:
        for service in file.services_by_name.values():
            for method in service.methods:
                options = method.GetOptions()
                if not options.HasExtension(options_pb2.access_policy):
                    continue
                declared = options.Extensions[options_pb2.access_policy]
                found[f"/{service.full_name}/{method.name}"] = MethodPolicy(
                    public=declared.public,
                    roles=frozenset(declared.roles),
                    self_field=tuple(declared.self_field.split(".")) if declared.self_field else (),
                )
    return found


def _field(request: Any, path: tuple[str, ...]) -> Any:
    value = request
    for name in path:
        value = getattr(value, name)
    return value


def _denied(message: str) -> Callable[..., Awaitable[Any]]:
    async def deny(request: Any, context: Context) -> Any:
        raise PermissionDenied(message)

    return deny


class AuthInterceptor(UnaryWrappingInterceptor):
    """Verifies the bearer token and applies the method's policy before the servicer runs."""

    def __init__(self, authenticator: Authenticator, policies: dict[str, MethodPolicy]) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._policies = policies

    def handler_for(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        policy = self._policies.get(method)
        if policy is not None and policy.public:
            return handler
        if handler.unary_unary is None:
            stream = handler.unary_stream
            if policy is None or stream is None or not inspect.isasyncgenfunction(stream):
                # Default deny; and no other kind of streaming method of ours needs a caller.
                return grpc.unary_unary_rpc_method_handler(_denied("method not allowed"))
            return rebuild_stream(
                handler, self._guard_stream(method, policy, cast(StreamBehavior, stream))
            )
        if policy is None:
            return rebuild(handler, _denied("method has no access policy"))
        # grpc.aio handlers are coroutine functions; the stubs type them as sync.
        return rebuild(
            handler, self._guard(method, policy, cast(UnaryBehavior, handler.unary_unary))
        )

    async def _admit(
        self, method: str, policy: MethodPolicy, request: Any, context: Context
    ) -> tuple[Principal, str | None]:
        """The caller, if its token is good and the policy lets it call; and its header."""
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else None
                break
        principal = await self._authenticator.authenticate(authorization)
        if principal.password_change_required and method not in PASSWORD_CHANGE_METHODS:
            raise PasswordChangeRequired()
        if not policy.roles & principal.roles and not (
            policy.self_field and _is_self(request, policy.self_field, principal.user_id)
        ):
            raise PermissionDenied()
        record = call_record_var.get()
        if record is not None:
            record.principal = principal
        return principal, authorization

    def _guard(self, method: str, policy: MethodPolicy, behavior: UnaryBehavior) -> UnaryBehavior:
        admit = self._admit

        async def guarded(request: Any, context: Context) -> Any:
            principal, _ = await admit(method, policy, request, context)
            token = principal_var.set(principal)
            try:
                return await behavior(request, context)
            finally:
                principal_var.reset(token)

        return guarded

    def _guard_stream(
        self, method: str, policy: MethodPolicy, behavior: StreamBehavior
    ) -> StreamBehavior:
        """Admitted before the first message like a unary call; then the token is checked
        again every STREAM_RECHECK_SECONDS while the stream is open, and the stream ends
        with UNAUTHENTICATED once it is revoked or expired: a stream never outlives its
        credentials."""
        admit = self._admit
        authenticate = self._authenticator.authenticate

        async def still_valid(authorization: str | None) -> None:
            while True:
                await asyncio.sleep(STREAM_RECHECK_SECONDS)
                await authenticate(authorization)  # raises Unauthenticated when not

        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            principal, authorization = await admit(method, policy, request, context)
            principal_var.set(principal)
            responses = cast(AsyncGenerator[Any, None], behavior(request, context))

            async def step() -> tuple[bool, Any]:
                try:
                    return True, await anext(responses)
                except StopAsyncIteration:
                    return False, None

            checker = asyncio.ensure_future(still_valid(authorization))
            pending: asyncio.Future[tuple[bool, Any]] | None = None
            try:
                while True:
                    # The stream's next message or the end of its credentials, whichever first.
                    pending = asyncio.ensure_future(step())
                    await asyncio.wait((pending, checker), return_when=asyncio.FIRST_COMPLETED)
                    if not pending.done():
                        checker.result()  # raises why the credentials ended
                        raise AssertionError("credential check returned")  # pragma: no cover
                    more, response = pending.result()
                    if not more:
                        return
                    yield response
            finally:
                # Also when the caller hung up (cancelled) while a message was being made.
                for task in (pending, checker):
                    if task is not None and not task.done():
                        task.cancel()
                await asyncio.gather(
                    *(t for t in (pending, checker) if t is not None), return_exceptions=True
                )
                await responses.aclose()

        return guarded


def _is_self(request: Any, path: tuple[str, ...], user_id: uuid.UUID) -> bool:
    """The field holds the caller's id; a repeated field, only the caller's id, at least once."""
    value = _field(request, path)
    values = [value] if isinstance(value, str) else list(value)
    try:
        return bool(values) and all(uuid.UUID(str(v)) == user_id for v in values)
    except ValueError:
        return False
