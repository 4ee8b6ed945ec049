"""The welcome e-mail message and the retry backoff, without network or database."""

from __future__ import annotations

import random
import re
import uuid
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest

from usersvc.notifications.dispatcher import backoff_delay
from usersvc.notifications.welcome_email import (
    WELCOME_SUBJECT,
    build_welcome_email,
    message_id_for,
)

CREATED = datetime(2026, 11, 27, 8, 30, 15, tzinfo=UTC)


def build(outbox_id: uuid.UUID, *, recipient: str = "ada@example.com", name: str = "Ada") -> str:
    message = build_welcome_email(
        outbox_id=outbox_id,
        sender="usersvc <no-reply@example.com>",
        recipient=recipient,
        name=name,
        date=CREATED,
    )
    return message.as_string()


def without_boundaries(raw: str) -> str:
    """The message with its random MIME boundaries blanked out."""
    return re.sub(r"={15}\d+==", "BOUNDARY", raw)


def test_every_attempt_builds_the_same_message() -> None:
    outbox_id = uuid.uuid4()
    first = build(outbox_id)
    assert without_boundaries(build(outbox_id)) == without_boundaries(first)
    assert f"Message-ID: {message_id_for(outbox_id)}" in first
    assert message_id_for(outbox_id) == f"<{outbox_id}@usersvc>"
    assert message_id_for(uuid.uuid4()) != message_id_for(outbox_id)


def test_headers_and_parts() -> None:
    message = build_welcome_email(
        outbox_id=uuid.uuid4(),
        sender="usersvc <no-reply@example.com>",
        recipient="ada@example.com",
        name='Ada "A&B" <Lovelace>',
        date=CREATED,
    )
    assert message["Subject"] == WELCOME_SUBJECT
    assert message["To"] == "ada@example.com"
    assert parsedate_to_datetime(str(message["Date"])) == CREATED
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",))
    markup = message.get_body(preferencelist=("html",))
    assert text is not None
    assert markup is not None
    assert 'Hello Ada "A&B" <Lovelace>,' in text.get_content()
    assert "Hello Ada &quot;A&amp;B&quot; &lt;Lovelace&gt;," in markup.get_content()


def test_a_recipient_with_a_line_break_cannot_inject_headers() -> None:
    with pytest.raises(ValueError, match=r"linefeed|carriage return|CR|LF"):
        build(uuid.uuid4(), recipient="ada@example.com\r\nBcc: eve@example.com")


def test_backoff_grows_exponentially_within_its_jitter_and_stops_at_the_cap() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 20.0), (9, 20.0)]:
        delays = [backoff_delay(attempt, base=2.0, maximum=20.0, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered, so retries of one outage spread out


def test_backoff_of_a_huge_attempt_number_is_the_cap() -> None:
    delay = backoff_delay(10_000, base=2.0, maximum=900.0, rng=random.Random(1))
    assert 450.0 <= delay <= 900.0
