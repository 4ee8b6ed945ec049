"""Mails that carry a one-time code (e-mail verification, password recovery), rendered from
shipped templates.

The code is in the body only: never in a header (headers end up in mail logs), never logged.
"""

from __future__ import annotations

import html
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from usersvc.domain.events import TOPIC_EMAIL_VERIFICATION, TOPIC_PASSWORD_RECOVERY
from usersvc.notifications.welcome_email import message_id_for, template


@dataclass(frozen=True, slots=True)
class CodeMail:
    subject: str
    template: str


CODE_MAILS = {
    TOPIC_EMAIL_VERIFICATION: CodeMail("Confirm your e-mail address", "verify_email"),
    TOPIC_PASSWORD_RECOVERY: CodeMail("Your password recovery code", "recover_password"),
}


def build_code_email(
    *,
    topic: str,
    outbox_id: uuid.UUID,
    sender: str,
    recipient: str,
    name: str,
    payload: dict[str, Any],
    date: datetime,
) -> EmailMessage:
    """The mail of one outbox record of a code topic, the same on every attempt."""
    kind = CODE_MAILS[topic]
    values = {
        "name": name,
        "user_id": str(payload["user_id"]),
        "code": str(payload["code"]),
        "expire_time": datetime.fromisoformat(payload["expire_time"]).strftime("%Y-%m-%d %H:%M"),
    }
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = kind.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id_for(outbox_id)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(template(f"{kind.template}.txt").substitute(values))
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    message.add_alternative(template(f"{kind.template}.html").substitute(escaped), subtype="html")
    return message
