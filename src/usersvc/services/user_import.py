"""BatchCreateUsers: many users in one call, with passwords or imported password hashes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from usersvc.domain import audit, user_events
from usersvc.domain.audit import AuditEvent, redact
from usersvc.domain.auth import RequestContext
from usersvc.domain.errors import (
    AlreadyExists,
    BatchAborted,
    DuplicateRequest,
    EmailLookalike,
    EmailTaken,
    FieldViolation,
    PermissionDenied,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_USER_CREATED, OutboxMessage
from usersvc.domain.labels import check_admin_metadata, check_labels
from usersvc.domain.models import EntryOutcome, User, UserState
from usersvc.domain.password_hashes import HashFormatError, parse_password_hash
from usersvc.domain.validation import (
    check_email,
    check_name,
    check_roles,
    email_skeleton,
    parse_user_id,
)
from usersvc.services.idempotency import IdempotentCreates
from usersvc.services.ports import Clock, PasswordHasher, UnitOfWork, UnitOfWorkFactory
from usersvc.services.transactions import in_transaction

# AIP-233: a batch is bounded; more entries than this is INVALID_ARGUMENT for the whole call.
BATCH_CREATE_MAX = 1000
# Plain-text passwords of one batch in the hash pool at once: the pool's own bound still
# holds, and one import leaves room in its queue for Logins.
HASH_WINDOW = 4
# A concurrent writer taking one of the batch's e-mails between the check and the insert
# makes the insert fail; the batch is checked and written again this many times at most.
WRITE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class NewUserEntry:
    """One user to create: exactly one of `password` and `password_hash` is expected."""

    email: str
    name: str
    password: str | None = None
    password_hash: str | None = None
    roles: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    admin_metadata: Mapping[str, Any] = field(default_factory=dict)
    password_change_required: bool = False


@dataclass(slots=True)
class _Pending:
    """An entry that passed validation, on its way to the database."""

    index: int
    email: str
    name: str
    roles: tuple[str, ...]
    password: str | None
    password_hash: str | None
    hash_format: str
    labels: dict[str, str] = field(default_factory=dict)
    admin_metadata: dict[str, Any] = field(default_factory=dict)
    password_change_required: bool = False


class UserImport:
    """Creates up to BATCH_CREATE_MAX users per call; per-entry outcomes in request order."""

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        clock: Clock,
        creates: IdempotentCreates,
        check_new_password: Callable[[str, str], FieldViolation | None],
    ) -> None:
        self._uow = uow
        self._hasher = hasher
        self._clock = clock
        self._creates = creates
        self._check_new_password = check_new_password

    async def batch_create(
        self,
        *,
        ctx: RequestContext,
        entries: Sequence[NewUserEntry],
        all_or_nothing: bool,
        request_id: str = "",
    ) -> list[EntryOutcome]:
        """Validate every entry, hash plain-text passwords in the pool, write the valid ones
        with their audit records and welcome messages in one transaction of a few multi-row
        statements. With `all_or_nothing`, one failed entry writes nothing and the others
        are answered BatchAborted. A `request_id` makes a retry return the first outcome."""
        violations: list[FieldViolation] = []
        if not entries:
            violations.append(FieldViolation("users", "at least one entry is required", "REQUIRED"))
        elif len(entries) > BATCH_CREATE_MAX:
            violations.append(
                FieldViolation(
                    "users",
                    f"at most {BATCH_CREATE_MAX} entries per call, got {len(entries)}",
                    "TOO_MANY",
                )
            )
        if request_id:
            _, id_violation = parse_user_id(request_id, "request_id")
            violations.extend([id_violation] if id_violation else [])
        if violations:
            raise ValidationFailed(violations)
        caller = ctx.actor.audit_name
        key = request_id.lower()
        fingerprint = self._creates.batch_fingerprint(
            all_or_nothing,
            [_fingerprint_entry(e) for e in entries],
        )
        if request_id:
            earlier = await self._creates.remembered_batch(caller, key, fingerprint)
            if earlier is not None:
                return earlier

        outcomes: list[EntryOutcome | None] = [None] * len(entries)
        # A thousand entries take a noticeable slice of CPU to validate (e-mail syntax, ICU
        # skeletons): in a thread, other calls on the event loop keep their turn meanwhile.
        pending = await asyncio.to_thread(self._validate, ctx, entries, outcomes)
        await self._refuse_taken(pending, outcomes, all_or_nothing)
        if all_or_nothing and any(o is not None for o in outcomes):
            return _aborted(outcomes)
        await self._hash_passwords(pending)

        attempt = 0
        while True:
            attempt += 1
            try:
                written = await in_transaction(
                    self._uow,
                    lambda uow: self._write(
                        uow,
                        ctx=ctx,
                        pending=pending,
                        outcomes=list(outcomes),
                        all_or_nothing=all_or_nothing,
                        caller=caller,
                        key=key,
                        fingerprint=fingerprint if request_id else "",
                    ),
                )
            except DuplicateRequest:
                # A concurrent call with the same request_id committed first: answer as it did.
                earlier = await self._creates.remembered_batch(caller, key, fingerprint)
                if earlier is None:
                    raise
                return earlier
            except AlreadyExists:
                # An e-mail was taken between the check and the insert: check again.
                if attempt >= WRITE_ATTEMPTS:
                    raise
                continue
            return written

    def _validate(
        self,
        ctx: RequestContext,
        entries: Sequence[NewUserEntry],
        outcomes: list[EntryOutcome | None],
    ) -> list[_Pending]:
        """Entries that pass every check; the others get their error in `outcomes`."""
        pending: list[_Pending] = []
        seen_emails: set[str] = set()
        seen_skeletons: set[str] = set()
        held = ctx.actor.roles
        for index, entry in enumerate(entries):
            prefix = f"users[{index}]."
            email, email_violation = check_email(entry.email, prefix + "email")
            name, name_violation = check_name(entry.name, prefix + "name")
            roles, roles_violation = check_roles(entry.roles, prefix + "roles")
            labels, label_violations = check_labels(entry.labels, prefix + "labels")
            metadata, metadata_violation = check_admin_metadata(
                entry.admin_metadata, prefix + "admin_metadata"
            )
            credential_violation: FieldViolation | None = None
            hash_format = ""
            if entry.password is not None and entry.password_hash is not None:
                credential_violation = FieldViolation(
                    prefix + "password_hash",
                    "set either password or password_hash, not both",
                    "CONFLICTING_FIELDS",
                )
            elif entry.password_hash is not None:
                try:
                    parsed = parse_password_hash(entry.password_hash)
                    hash_format = parsed.variant or parsed.scheme.value
                except HashFormatError as err:
                    credential_violation = FieldViolation(
                        prefix + "password_hash", str(err), "UNSUPPORTED_HASH"
                    )
            elif entry.password is not None:
                credential_violation = self._check_new_password(entry.password, prefix + "password")
            else:
                credential_violation = FieldViolation(
                    prefix + "password", "password or password_hash is required", "REQUIRED"
                )
            found = [
                v
                for v in (
                    email_violation,
                    name_violation,
                    credential_violation,
                    roles_violation,
                    *label_violations,
                    metadata_violation,
                )
                if v
            ]
            if found:
                outcomes[index] = EntryOutcome(error=ValidationFailed(found))
                continue
            if not set(roles) <= held:
                outcomes[index] = EntryOutcome(
                    error=PermissionDenied("a caller may grant only roles it holds itself")
                )
                continue
            if metadata and not ctx.actor.is_admin:
                # The contract lets only admins call this; the rule holds here on its own too.
                outcomes[index] = EntryOutcome(
                    error=PermissionDenied("only admins may set admin_metadata")
                )
                continue
            skeleton = email_skeleton(email)
            if email in seen_emails or skeleton in seen_skeletons:
                # The earlier entry with this address (or a look-alike) wins, as it would
                # if the entries were sent one by one in order.
                outcomes[index] = EntryOutcome(
                    error=EmailTaken() if email in seen_emails else EmailLookalike()
                )
                continue
            seen_emails.add(email)
            seen_skeletons.add(skeleton)
            pending.append(
                _Pending(
                    index=index,
                    email=email,
                    name=name,
                    roles=roles,
                    password=entry.password if entry.password_hash is None else None,
                    password_hash=entry.password_hash,
                    hash_format=hash_format or "argon2id",
                    labels=labels,
                    admin_metadata=metadata,
                    password_change_required=entry.password_change_required,
                )
            )
        return pending

    async def _refuse_taken(
        self, pending: list[_Pending], outcomes: list[EntryOutcome | None], all_or_nothing: bool
    ) -> None:
        """Before any hashing: entries whose e-mail a stored user has (or looks like)."""
        if not pending or (all_or_nothing and any(o is not None for o in outcomes)):
            return
        async with self._uow(write=False) as uow:
            conflicts = await uow.users.email_conflicts([p.email for p in pending])
        _mark_conflicts(pending, outcomes, conflicts)

    async def _hash_passwords(self, pending: list[_Pending]) -> None:
        """Plain-text passwords through the hash pool, a few at a time; imported hashes as
        they are."""
        window = asyncio.Semaphore(HASH_WINDOW)

        async def hash_one(entry: _Pending) -> None:
            assert entry.password is not None
            async with window:
                entry.password_hash = await self._hasher.hash(entry.password)

        await asyncio.gather(*(hash_one(p) for p in pending if p.password_hash is None))

    async def _write(
        self,
        uow: UnitOfWork,
        *,
        ctx: RequestContext,
        pending: list[_Pending],
        outcomes: list[EntryOutcome | None],
        all_or_nothing: bool,
        caller: str,
        key: str,
        fingerprint: str,
    ) -> list[EntryOutcome]:
        # Checked again inside the writing transaction: another writer may have come first.
        candidates = [p for p in pending if outcomes[p.index] is None]
        conflicts = await uow.users.email_conflicts([p.email for p in candidates])
        _mark_conflicts(candidates, outcomes, conflicts)
        if all_or_nothing and any(o is not None for o in outcomes):
            return _aborted(outcomes)
        now = self._clock()
        new_users: list[User] = []
        welcomes: list[OutboxMessage] = []
        events: list[AuditEvent] = []
        for entry in candidates:
            if outcomes[entry.index] is not None:
                continue
            assert entry.password_hash is not None
            user = User(
                id=uuid.uuid4(),
                email=entry.email,
                name=entry.name,
                password_hash=entry.password_hash,
                roles=entry.roles,
                state=UserState.ACTIVE,
                create_time=now,
                update_time=now,
                version=1,
                # At creation, as for CreateUser (an imported hash's age elsewhere is unknown).
                password_change_time=now,
                labels=entry.labels,
                admin_metadata=entry.admin_metadata,
                password_change_required=entry.password_change_required,
            )
            new_users.append(user)
            welcomes.append(
                OutboxMessage(
                    topic=TOPIC_USER_CREATED,
                    aggregate_id=user.id,
                    payload={"user_id": str(user.id), "email": user.email, "name": user.name},
                    request_id=ctx.request_id,
                    create_time=now,
                )
            )
            events.append(_created_event(ctx, user, entry.hash_format, now))
            outcomes[entry.index] = EntryOutcome(user=user.view())
        final = [o if o is not None else EntryOutcome() for o in outcomes]
        if not new_users:
            return final  # nothing to write, nothing to remember
        if fingerprint:
            # First, so that a concurrent retry waits on this key (and then answers with
            # our result) instead of failing on the e-mails this call takes.
            await self._creates.remember_batch(
                uow, caller=caller, request_id=key, fingerprint=fingerprint, outcomes=final, now=now
            )
        # Same transaction: no user without its welcome message, audit record and feed event.
        await uow.users.add_many(new_users)
        await uow.outbox.add_many(welcomes)
        await uow.audit.add_many(events)
        await uow.user_events.add_many(
            [user_events.created(user.view(), ctx.request_id, now) for user in new_users]
        )
        await uow.commit()
        return final


def _fingerprint_entry(entry: NewUserEntry) -> list[Any]:
    fields: list[Any] = [
        entry.email,
        entry.name,
        entry.password,
        entry.password_hash,
        sorted(set(entry.roles)),
    ]
    if entry.labels or entry.admin_metadata:
        # Only when set: batches remembered before these fields existed keep their fingerprint.
        fields.append([dict(entry.labels), dict(entry.admin_metadata)])
    if entry.password_change_required:
        # The same: the flag only when set.
        fields.append(True)
    return fields


def _mark_conflicts(
    pending: Sequence[_Pending], outcomes: list[EntryOutcome | None], conflicts: dict[str, bool]
) -> None:
    for entry in pending:
        if entry.email in conflicts:
            error = EmailTaken() if conflicts[entry.email] else EmailLookalike()
            outcomes[entry.index] = EntryOutcome(error=error)


def _aborted(outcomes: Sequence[EntryOutcome | None]) -> list[EntryOutcome]:
    return [o if o is not None else EntryOutcome(error=BatchAborted()) for o in outcomes]


def _created_event(ctx: RequestContext, user: User, hash_format: str, now: datetime) -> AuditEvent:
    changes: dict[str, tuple[Any, Any]] = {
        "email": (None, user.email),
        "name": (None, user.name),
        "roles": (None, list(user.roles)),
        "state": (None, user.state.value),
        "password": (None, "set"),
        # The format only (argon2id, bcrypt, ...), never the hash.
        "password_format": (None, hash_format),
    }
    if user.labels:
        changes["labels"] = (None, dict(user.labels))
    if user.admin_metadata:
        changes["admin_metadata"] = (None, dict(user.admin_metadata))
    if user.password_change_required:
        changes["password_change_required"] = (None, True)
    return AuditEvent(
        user_id=user.id,
        action=audit.USER_CREATED,
        changes=redact(changes),
        actor=ctx.actor.audit_name,
        request_id=ctx.request_id,
        create_time=now,
    )
