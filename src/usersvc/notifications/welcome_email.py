"""The welcome e-mail: plain text plus an HTML alternative, rendered from shipped templates."""

from __future__ import annotations

import html
import uuid
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from functools import cache
from importlib import resources
from string import Template

WELCOME_SUBJECT = "Welcome! Your account is ready"
# A fixed right-hand side, not the sender's domain: the Message-ID must stay the same for a
# record even if the configured sender changes between two attempts, or dedup would miss.
MESSAGE_ID_DOMAIN = "usersvc"


def message_id_for(outbox_id: uuid.UUID) -> str:
    """The Message-ID of the mail for one outbox record: identical on every attempt, so a
    mail system can drop the copy a crash between sending and recording resends."""
    return f"<{outbox_id}@{MESSAGE_ID_DOMAIN}>"


@cache
def template(file_name: str) -> Template:
    # Read once per process; shipped as package data (see pyproject package-data).
    text = (resources.files(__package__) / "templates" / file_name).read_text(encoding="utf-8")
    return Template(text)


def render_welcome(name: str) -> tuple[str, str]:
    """(plain text, HTML) bodies greeting `name`; the HTML gets the name escaped."""
    text = template("welcome.txt").substitute(name=name)
    markup = template("welcome.html").substitute(name=html.escape(name, quote=True))
    return text, markup


def build_welcome_email(
    *, outbox_id: uuid.UUID, sender: str, recipient: str, name: str, date: datetime
) -> EmailMessage:
    """The welcome e-mail for one outbox record, ready for SMTP.

    `date` is when the record was written, so every attempt produces the same message.
    """
    # The default policy (EmailMessage's) refuses CR/LF in header values: no header injection.
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = WELCOME_SUBJECT
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id_for(outbox_id)
    # RFC 3834: tells autoresponders (vacation replies) not to answer a machine.
    message["Auto-Submitted"] = "auto-generated"
    text, markup = render_welcome(name)
    message.set_content(text)
    message.add_alternative(markup, subtype="html")
    return message
