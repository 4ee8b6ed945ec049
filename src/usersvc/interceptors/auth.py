"""Authentication and per-method authorization, from policies declared in the contract.

Each method's `(userservice.v1.access_policy)` option is read from the descriptors once, at
start-up. A method without a policy is denied to everyone (default deny).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.descriptor import FileDescriptor

from userservice.v1 import options_pb2
from usersvc.context import call_record_var, principal_var
from usersvc.domain.errors import PermissionDenied
from usersvc.interceptors.base import Context, UnaryBehavior, UnaryWrappingInterceptor, rebuild
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
            # No streaming method of ours needs a caller; refuse rather than guess.
            return grpc.unary_unary_rpc_method_handler(_denied("method not allowed"))
        if policy is None:
            return rebuild(handler, _denied("method has no access policy"))
        # grpc.aio handlers are coroutine functions; the stubs type them as sync.
        return rebuild(handler, self._guard(policy, cast(UnaryBehavior, handler.unary_unary)))

    def _guard(self, policy: MethodPolicy, behavior: UnaryBehavior) -> UnaryBehavior:
        authenticate = self._authenticator.authenticate
        roles, self_field = policy.roles, policy.self_field

        async def guarded(request: Any, context: Context) -> Any:
            authorization = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    authorization = value if isinstance(value, str) else None
                    break
            principal = await authenticate(authorization)
            if not roles & principal.roles and not (
                self_field and _is_self(request, self_field, principal.user_id)
            ):
                raise PermissionDenied()
            token = principal_var.set(principal)
            record = call_record_var.get()
            if record is not None:
                record.principal = principal
            try:
                return await behavior(request, context)
            finally:
                principal_var.reset(token)

        return guarded


def _is_self(request: Any, path: tuple[str, ...], user_id: uuid.UUID) -> bool:
    """The field holds the caller's id; a repeated field, only the caller's id, at least once."""
    value = _field(request, path)
    values = [value] if isinstance(value, str) else list(value)
    try:
        return bool(values) and all(uuid.UUID(str(v)) == user_id for v in values)
    except ValueError:
        return False
