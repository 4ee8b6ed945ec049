"""SmtpSender: hands one e-mail to the configured SMTP server through aiosmtplib."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib
from pydantic import SecretStr

from usersvc.config import Settings


class DeliveryFailed(Exception):
    """An attempt that did not get the message accepted; `smtp_code` if the server replied.

    Every failure is worth retrying up to the attempt limit: connection refused and timeouts
    are transient, 4xx replies say "try again later", and 5xx replies from a misconfigured or
    overloaded relay are often fixed by an operator within the retry window.
    """

    def __init__(self, reason: str, *, smtp_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.smtp_code = smtp_code


class SmtpSender:
    """One SMTP connection per message: simple, and nothing to keep alive between polls."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        starttls: bool,
        username: str,
        password: SecretStr,
        timeout_seconds: float,
    ) -> None:
        self._host = host
        self._port = port
        self._starttls = starttls
        self._username = username
        self._password = password
        self._timeout = timeout_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpSender:
        """A sender for the server, credentials and timeout named by USERSVC_SMTP_*."""
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=settings.smtp_password,
            timeout_seconds=settings.smtp_timeout_seconds,
        )

    async def send(self, message: EmailMessage) -> None:
        """Deliver `message` to its To address; DeliveryFailed if the server did not accept it."""
        try:
            await aiosmtplib.send(
                message,
                hostname=self._host,
                port=self._port,
                # Explicit: None would mean "upgrade if offered", so False never upgrades and
                # True fails when the server does not offer STARTTLS, instead of silently
                # sending the credentials and the mail in clear.
                start_tls=self._starttls,
                username=self._username or None,
                password=self._password.get_secret_value() if self._username else None,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as err:
            refused = err.recipients[0] if err.recipients else None
            code = refused.code if refused is not None else None
            text = refused.message if refused is not None else "recipient refused"
            raise DeliveryFailed(f"SMTP {code}: {text}", smtp_code=code) from err
        except aiosmtplib.SMTPResponseException as err:
            raise DeliveryFailed(f"SMTP {err.code}: {err.message}", smtp_code=err.code) from err
        except (aiosmtplib.SMTPTimeoutError, TimeoutError) as err:
            raise DeliveryFailed(f"SMTP timeout after {self._timeout} s: {err}") from err
        except (aiosmtplib.SMTPException, OSError) as err:
            # Connection refused or reset, DNS failure, STARTTLS not offered, TLS errors.
            raise DeliveryFailed(f"SMTP {type(err).__name__}: {err}") from err
