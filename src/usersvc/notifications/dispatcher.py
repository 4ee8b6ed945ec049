"""OutboxDispatcher: delivers the e-mails announced in the outbox (welcome, e-mail
verification codes), with retries.

One round: claim due rows under a lease (short transaction), send each outside any
transaction, settle each row (short transaction). Several dispatchers (replicas) may run at
once: claims are disjoint, and a dispatcher that dies mid-round leaves leases that run out, so
its rows are picked up again, with the same Message-ID, which lets mail systems drop a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import timedelta
from email.message import EmailMessage
from typing import Protocol

from opentelemetry import trace

from usersvc.domain.errors import StorageUnavailable
from usersvc.domain.events import TOPIC_USER_CREATED
from usersvc.domain.records import ClaimedOutboxMessage
from usersvc.metrics import Metrics
from usersvc.notifications.code_emails import CODE_MAILS, build_code_email
from usersvc.notifications.smtp import DeliveryFailed
from usersvc.notifications.welcome_email import build_welcome_email
from usersvc.services.clock import utc_now
from usersvc.services.ports import Clock, UnitOfWorkFactory
from usersvc.trace_context import link_to

log = logging.getLogger(__name__)

# RFC 6761: names under .invalid never resolve, so mail to them can never be delivered (the
# operator tasks give service accounts such addresses); no point retrying for hours.
UNDELIVERABLE_DOMAIN_SUFFIX = ".invalid"
# 2 ** 60 times any sane base is past every cap; bounding the exponent avoids float overflow.
_MAX_EXPONENT = 60


class EmailSender(Protocol):
    """Hands one message to a mail server; raises DeliveryFailed when it is not accepted."""

    async def send(self, message: EmailMessage) -> None: ...


def backoff_delay(attempt: int, *, base: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first failure).

    Exponential (base, 2*base, 4*base, ...) up to `maximum`, with "equal jitter": half of the
    delay fixed, half random, so messages that failed together (a mail outage) spread out
    when it ends, while the wait still grows with every attempt.
    """
    ceiling = min(maximum, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class OutboxDispatcher:
    """Claims due records, sends each one's e-mail, records the outcome."""

    topics = (TOPIC_USER_CREATED, *CODE_MAILS)

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        sender: EmailSender,
        metrics: Metrics,
        sender_address: str,
        clock: Clock = utc_now,
        batch_size: int = 20,
        poll_seconds: float = 1.0,
        lease_seconds: float = 60.0,
        send_timeout_seconds: float = 10.0,
        send_concurrency: int = 4,
        max_attempts: int = 8,
        backoff_base_seconds: float = 2.0,
        backoff_max_seconds: float = 900.0,
        rng: random.Random | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if lease_seconds <= send_timeout_seconds:
            # Settings refuse this at start-up; the guard is for other callers.
            raise ValueError(
                f"the outbox lease ({lease_seconds} s) must be longer than the SMTP timeout "
                f"({send_timeout_seconds} s)"
            )
        self._uow = uow
        self._sender = sender
        self._metrics = metrics
        self._sender_address = sender_address
        self._clock = clock
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._lease = timedelta(seconds=lease_seconds)
        self._send_timeout = send_timeout_seconds
        self._send_slots = asyncio.Semaphore(send_concurrency)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base_seconds
        self._backoff_max = backoff_max_seconds
        self._rng = rng or random.Random()
        self._tracer = tracer or trace.NoOpTracer()

    async def run_once(self) -> int:
        """One round: claim up to a batch of due records and settle each; how many were claimed."""
        now = self._clock()
        async with self._uow(write=True) as tx:
            claimed = await tx.outbox.claim_due(
                topics=self.topics,
                now=now,
                lease_until=now + self._lease,
                limit=self._batch_size,
            )
            await tx.commit()
        if not claimed:
            return 0
        results = await asyncio.gather(
            *(self._process(message) for message in claimed), return_exceptions=True
        )
        for message, result in zip(claimed, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation and the like are not ours to swallow
            if isinstance(result, Exception):
                # Only settling can get here (the database went away): the lease runs out and
                # the record is tried again, possibly resent with the same Message-ID.
                log.error(
                    "outbox record not settled",
                    exc_info=result,
                    extra={
                        "request_id": message.request_id,
                        "outbox_id": str(message.id),
                        "topic": message.topic,
                    },
                )
        return len(claimed)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Poll every poll_seconds until `stop` is set; a full batch polls again at once.

        Errors (the database being unavailable) are logged and the next poll tries again, so
        an outage never ends the dispatcher.
        """
        log.info("e-mail dispatcher started")
        while not stop.is_set():
            try:
                processed = await self.run_once()
            except StorageUnavailable:
                log.warning("outbox dispatch skipped a round: database unavailable")
                processed = 0
            except Exception:
                log.exception("outbox dispatch round failed")
                processed = 0
            if processed >= self._batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._poll_seconds)
        log.info("e-mail dispatcher stopped")

    async def _process(self, message: ClaimedOutboxMessage) -> None:
        # Its own trace (delivery happens long after the call), linked to the creating call's.
        with self._tracer.start_as_current_span(
            f"outbox deliver {message.topic}",
            kind=trace.SpanKind.CONSUMER,
            links=link_to(message.trace_context),
            attributes={
                "usersvc.outbox_id": str(message.id),
                "usersvc.attempt": message.attempts + 1,
            },
        ):
            await self._deliver(message)

    async def _deliver(self, message: ClaimedOutboxMessage) -> None:
        async with self._send_slots:
            if message.user_email is None or message.user_name is None:
                await self._skip(message, "user deleted before delivery")
                return
            code_mail = message.topic in CODE_MAILS
            recipient = str(message.payload["email"]) if code_mail else message.user_email
            if code_mail and recipient != message.user_email:
                # A code for an address the user has since changed works no more.
                await self._skip(message, "the user's e-mail changed before delivery")
                return
            if recipient.lower().endswith(UNDELIVERABLE_DOMAIN_SUFFIX):
                await self._skip(message, "address under .invalid cannot receive mail")
                return
            if self._clock() + timedelta(seconds=self._send_timeout) > message.claimed_until:
                # Waited so long for a slot that a send could outlast the lease and race
                # another dispatcher; hand the record back for the next round instead.
                async with self._uow(write=True) as tx:
                    await tx.outbox.release(message.id, claimed_until=message.claimed_until)
                    await tx.commit()
                return
            try:
                if code_mail:
                    email = build_code_email(
                        topic=message.topic,
                        outbox_id=message.id,
                        sender=self._sender_address,
                        recipient=recipient,
                        name=message.user_name,
                        payload=message.payload,
                        date=message.create_time,
                    )
                else:
                    email = build_welcome_email(
                        outbox_id=message.id,
                        sender=self._sender_address,
                        recipient=recipient,
                        name=message.user_name,
                        date=message.create_time,
                    )
                async with asyncio.timeout(self._send_timeout):
                    await self._sender.send(email)
            except DeliveryFailed as err:
                await self._failed(message, err.reason, smtp_code=err.smtp_code)
                return
            except TimeoutError:
                await self._failed(message, f"SMTP gave no answer within {self._send_timeout} s")
                return
            except Exception as err:
                # A bug or bad data (an address the e-mail library refuses); retried like any
                # failure so it ends as `failed` with a reason, never silently pending.
                log.exception(
                    "e-mail could not be built or sent",
                    extra={
                        "request_id": message.request_id,
                        "outbox_id": str(message.id),
                        "topic": message.topic,
                    },
                )
                await self._failed(message, f"{type(err).__name__}: {err}")
                return
            await self._delivered(message, recipient)

    async def _delivered(self, message: ClaimedOutboxMessage, recipient: str) -> None:
        async with self._uow(write=True) as tx:
            recorded = await tx.outbox.mark_delivered(message.id, now=self._clock())
            await tx.commit()
        self._metrics.outbox_delivered.labels(topic=message.topic).inc()
        log.info(
            "e-mail sent",
            extra={
                "request_id": message.request_id,
                "outbox_id": str(message.id),
                "topic": message.topic,
                "recipient": recipient,
                "attempt": message.attempts + 1,
                # False: another dispatcher settled it first (our lease had run out).
                "recorded": recorded,
            },
        )

    async def _skip(self, message: ClaimedOutboxMessage, reason: str) -> None:
        async with self._uow(write=True) as tx:
            await tx.outbox.mark_skipped(
                message.id, claimed_until=message.claimed_until, reason=reason, now=self._clock()
            )
            await tx.commit()
        log.info(
            "e-mail skipped",
            extra={
                "request_id": message.request_id,
                "outbox_id": str(message.id),
                "topic": message.topic,
                "reason": reason,
            },
        )

    async def _failed(
        self, message: ClaimedOutboxMessage, reason: str, *, smtp_code: int | None = None
    ) -> None:
        attempts = message.attempts + 1
        now = self._clock()
        fields = {
            "request_id": message.request_id,
            "outbox_id": str(message.id),
            "topic": message.topic,
            "recipient": message.user_email,
            "attempt": attempts,
            "max_attempts": self._max_attempts,
            "error": reason,
            "smtp_code": smtp_code,
        }
        if attempts >= self._max_attempts:
            async with self._uow(write=True) as tx:
                await tx.outbox.mark_failed(
                    message.id,
                    claimed_until=message.claimed_until,
                    attempts=attempts,
                    error=reason,
                    now=now,
                )
                await tx.commit()
            self._metrics.outbox_failed.labels(topic=message.topic).inc()
            log.warning("e-mail failed; giving up", extra=fields)
            return
        delay = backoff_delay(
            attempts, base=self._backoff_base, maximum=self._backoff_max, rng=self._rng
        )
        async with self._uow(write=True) as tx:
            await tx.outbox.schedule_retry(
                message.id,
                claimed_until=message.claimed_until,
                attempts=attempts,
                next_attempt_time=now + timedelta(seconds=delay),
                error=reason,
                now=now,
            )
            await tx.commit()
        self._metrics.outbox_retried.labels(topic=message.topic).inc()
        log.warning("e-mail not sent; will retry", extra={**fields, "retry_in_seconds": delay})
