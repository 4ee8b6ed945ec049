"""WatchUserEvents as an iterator of events that remembers where it is."""

from __future__ import annotations

from typing import Any

import grpc

from userservice.client.errors import ApiError
from userservice.v1 import user_service_pb2


class UserEventStream:
    """The events of one WatchUserEvents call, in commit order (checkpoints are not yielded).

    ``resume_token`` is the token of the last message received, checkpoints included: after
    any error or ``cancel()``, ``watch_user_events(after=stream.resume_token)`` goes on right
    after it, none lost and none repeated. A failure raises ``ApiError``; the stream ending
    because it was read too slowly is ``ResourceExhausted`` with reason ``CONSUMER_TOO_SLOW``,
    a server shutting down ``Unavailable`` with reason ``SHUTTING_DOWN``: both resume.
    """

    def __init__(self, call: Any, first: user_service_pb2.WatchUserEventsResponse) -> None:
        self._call = call
        self.resume_token: str = first.resume_token

    def __iter__(self) -> UserEventStream:
        return self

    def __next__(self) -> user_service_pb2.UserEvent:
        try:
            while True:
                response: user_service_pb2.WatchUserEventsResponse = next(self._call)
                self.resume_token = response.resume_token
                if response.HasField("event"):
                    return response.event
        except grpc.RpcError as err:
            raise ApiError.from_rpc_error(err) from err

    def cancel(self) -> None:
        """End the call (the server sees CANCELLED); ``resume_token`` stays valid."""
        self._call.cancel()


class AsyncUserEventStream:
    """``UserEventStream`` for asyncio: ``async for event in stream``."""

    def __init__(self, call: Any, first: user_service_pb2.WatchUserEventsResponse) -> None:
        self._call = call
        self.resume_token: str = first.resume_token

    def __aiter__(self) -> AsyncUserEventStream:
        return self

    async def __anext__(self) -> user_service_pb2.UserEvent:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    raise StopAsyncIteration
                self.resume_token = response.resume_token
                if response.HasField("event"):
                    event: user_service_pb2.UserEvent = response.event
                    return event
        except grpc.RpcError as err:
            raise ApiError.from_rpc_error(err) from err

    def cancel(self) -> None:
        """End the call (the server sees CANCELLED); ``resume_token`` stays valid."""
        self._call.cancel()
