"""userservice.v1.AuthService: maps requests to the authentication use cases."""

from __future__ import annotations

from userservice.v1 import auth_service_pb2 as pb
from userservice.v1 import auth_service_pb2_grpc as pb_grpc
from usersvc.context import request_id_var
from usersvc.domain.auth import TokenPair
from usersvc.interceptors.base import Context
from usersvc.servicers.mapping import timestamp_from_epoch
from usersvc.services.auth import AuthService


def _pair(pair: TokenPair) -> pb.TokenPair:
    return pb.TokenPair(
        access_token=pair.access_token,
        access_token_expire_time=timestamp_from_epoch(pair.access_expires_at),
        refresh_token=pair.refresh_token,
        refresh_token_expire_time=timestamp_from_epoch(pair.refresh_expires_at),
        token_type="Bearer",
    )


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService) -> None:
        self._auth = auth

    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        pair = await self._auth.login(
            email=request.email, password=request.password, request_id=request_id_var.get()
        )
        return pb.LoginResponse(tokens=_pair(pair))

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Context
    ) -> pb.RefreshTokenResponse:
        pair = await self._auth.refresh(refresh_token=request.refresh_token)
        return pb.RefreshTokenResponse(tokens=_pair(pair))

    async def Logout(self, request: pb.LogoutRequest, context: Context) -> pb.LogoutResponse:
        await self._auth.logout(refresh_token=request.refresh_token)
        return pb.LogoutResponse()

    async def GetJwks(self, request: pb.GetJwksRequest, context: Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(keys=[pb.Jwk(**jwk) for jwk in self._auth.jwks()])
