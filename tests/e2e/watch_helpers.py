"""Blocking WatchUserEvents consumers in threads (never grpc.aio beside the in-process server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from userservice.v1 import user_service_pb2 as pb
from userservice.v1 import user_service_pb2_grpc

Event = pb.UserEvent


@dataclass
class Watch:
    """One stream read in a thread: every response, and how it ended."""

    stub: user_service_pb2_grpc.UserServiceStub
    token: str
    after: str = ""
    responses: list[pb.WatchUserEventsResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def __post_init__(self) -> None:
        self.done = threading.Event()
        self.call = self.stub.WatchUserEvents(
            pb.WatchUserEventsRequest(after=self.after),
            metadata=(("authorization", f"Bearer {self.token}"),),
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.done.set()

    @property
    def events(self) -> list[pb.UserEvent]:
        return [r.event for r in list(self.responses) if r.HasField("event")]

    @property
    def last_token(self) -> str:
        return self.responses[-1].resume_token if self.responses else self.after

    def wait_until(self, predicate: Callable[[Watch], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            if self.done.is_set():
                break
            time.sleep(0.01)
        assert predicate(self), (
            f"watch did not get there in {timeout} s: {len(self.events)} events, "
            f"error {self.error and self.error.code()}"
        )

    def wait_for_events(self, count: int, timeout: float = 10) -> list[pb.UserEvent]:
        self.wait_until(lambda w: len(w.events) >= count, timeout)
        return self.events

    def started(self, timeout: float = 10) -> Watch:
        """After the first message (the checkpoint): from here on nothing is missed."""
        self.wait_until(lambda w: bool(w.responses), timeout)
        return self

    def cancel(self) -> None:
        self.call.cancel()
        self.done.wait(10)

    def wait_done(self, timeout: float = 10) -> grpc.RpcError | None:
        assert self.done.wait(timeout), "stream did not end"
        return self.error
