"""A real SMTP server for tests (aiosmtpd in its own thread) that records what it accepts.

It can be told to refuse the next messages with a 4xx/5xx reply, to require credentials, and
to start later on a port picked before (the "mail server is down, then comes back" case).
"""

from __future__ import annotations

import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    login: str | None

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])

    def body(self, subtype: str) -> str:
        """The text/`subtype` part, decoded."""
        part = self.message.get_body(preferencelist=(subtype,))
        assert part is not None, f"no text/{subtype} part"
        assert isinstance(part, EmailMessage)
        content: str = part.get_content()
        return content


class RecordingHandler:
    """aiosmtpd handler: accepts and records messages, or refuses as told."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._received: list[ReceivedMail] = []
        self._refusals: list[str] = []
        self.refused = 0

    def refuse_next(self, count: int, reply: str = "451 4.3.0 Try again later") -> None:
        """Answer DATA of the next `count` messages with `reply` instead of accepting them."""
        with self._lock:
            self._refusals.extend([reply] * count)

    def clear(self) -> None:
        with self._lock:
            self._received.clear()
            self._refusals.clear()
            self.refused = 0

    @property
    def received(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._received)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """The received mail once there are at least `count` messages, or after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return list(self._received)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        with self._lock:
            if self._refusals:
                self.refused += 1
                return self._refusals.pop(0)
        raw = envelope.original_content or envelope.content
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        login = getattr(session, "auth_data", None)
        mail = ReceivedMail(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            message=parsed,
            login=login.decode() if isinstance(login, bytes) else None,
        )
        with self._lock:
            self._received.append(mail)
            self._lock.notify_all()
        return "250 2.0.0 OK"


class SmtpServer:
    """aiosmtpd on 127.0.0.1:`port`, startable and stoppable any number of times."""

    def __init__(
        self, port: int | None = None, *, credentials: tuple[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.handler = RecordingHandler()
        self._credentials = credentials
        self._controller: Controller | None = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> SmtpServer:
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {}
        if self._credentials is not None:
            # Plain AUTH without TLS is fine on loopback in a test.
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **kwargs)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self._credentials is not None
            and (auth_data.login.decode(), auth_data.password.decode()) == self._credentials
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
