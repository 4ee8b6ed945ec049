"""User management use cases: create, read, list, update, delete, passwords, state."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from usersvc.domain import audit, user_events
from usersvc.domain.audit import AuditEvent, change_event
from usersvc.domain.auth import ADMIN, SERVICE, SYSTEM, RequestContext
from usersvc.domain.errors import (
    DuplicateRequest,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    UserNotFound,
    UsersNotFound,
    ValidationFailed,
)
from usersvc.domain.events import TOPIC_USER_CREATED, OutboxMessage
from usersvc.domain.labels import check_admin_metadata, check_labels
from usersvc.domain.models import (
    ETAG_MAX,
    SERVICE_ACCOUNT_PASSWORD_HASH,
    EntryOutcome,
    User,
    UserState,
    UserView,
    is_etag_like,
    version_of_etag,
)
from usersvc.domain.one_time_codes import CodePurpose
from usersvc.domain.update_mask import admin_only, merged_labels, parse_update_mask
from usersvc.domain.user_events import change_of
from usersvc.domain.user_filter import FilterSyntaxError, UserFilter, parse_filter
from usersvc.domain.validation import (
    EMAIL_MAX,
    check_email,
    check_name,
    check_password,
    check_roles,
    normalize_email,
    parse_user_id,
)
from usersvc.services.clock import utc_now
from usersvc.services.idempotency import IdempotentCreates
from usersvc.services.paging import cut_page, parse_page_request
from usersvc.services.point_reads import UnitOfWorkPointReads
from usersvc.services.ports import (
    Clock,
    PageCursorCodec,
    PasswordHasher,
    UnitOfWork,
    UnitOfWorkFactory,
    UserPointReads,
)
from usersvc.services.transactions import in_transaction
from usersvc.services.user_import import NewUserEntry, UserImport

log = logging.getLogger(__name__)

# Unfiltered lists of at least this many users report an estimated total_size, which is then
# reused for ESTIMATE_SECONDS: paging through a large list costs no extra query per page.
EXACT_COUNT_BELOW = 10_000
ESTIMATE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ListUsersResult:
    users: Sequence[UserView]
    next_page_token: str
    total_size: int


@dataclass(frozen=True, slots=True)
class BatchGetUsersResult:
    """The users in request order (duplicates included) and, with allow_missing, the ids
    that matched no user, each once, in request order."""

    users: Sequence[UserView]
    missing_ids: Sequence[uuid.UUID]


# AIP-231: a batch is bounded; more ids than this is INVALID_ARGUMENT.
BATCH_GET_MAX = 1000
# Missing ids named in one NOT_FOUND; the rest are counted.
REPORTED_IDS_MAX = 10
# Malformed ids given a violation each; one more violation counts the rest, so that the
# answer stays within the error mapping's ten violations.
REPORTED_MALFORMED_MAX = 9


def require_user_id(raw: str, field: str = "id") -> uuid.UUID:
    user_id, violation = parse_user_id(raw, field)
    if violation is not None or user_id is None:
        raise ValidationFailed([violation or FieldViolation(field, "id must be a UUID")])
    return user_id


# Roles that may read any user (GetUser, BatchGetUsers); others read only themselves.
READ_ANY_ROLES = frozenset({ADMIN, SERVICE})

# The operator tooling acting on its own authority, outside any request.
OPERATOR = RequestContext(SYSTEM)

# The dormant-account job: users per read, reads per run, and the reason it audits.
DORMANT_BATCH = 100
DORMANT_BATCHES = 10
DORMANT_REASON = "dormant"


def _no_revocation_hook(user_id: uuid.UUID) -> None:
    return None


class UserService:
    """Create, read, list, update and delete users; change passwords; disable and enable.

    Every use case that changes data takes the request context (caller and request id), which
    the audit record and the outbox message carry.
    """

    def __init__(
        self,
        *,
        uow: UnitOfWorkFactory,
        hasher: PasswordHasher,
        page_tokens: PageCursorCodec,
        clock: Clock = utc_now,
        common_passwords: frozenset[str] = frozenset(),
        on_tokens_revoked: Callable[[uuid.UUID], None] = _no_revocation_hook,
        fingerprint_key: bytes = b"",
        idempotency_ttl_seconds: int = 24 * 3600,
        login_max_failures: int = 10,
        login_lock_seconds: int = 900,
        point_reads: UserPointReads | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        deleted_user_retention: timedelta = timedelta(days=30),
    ) -> None:
        self._uow = uow
        # How long a soft-deleted user can be undeleted before the purge removes it.
        self._retention = deleted_user_retention
        # ChangePassword checks passwords too: it shares Login's per-account lock.
        self._max_failures = login_max_failures
        self._lock = timedelta(seconds=login_lock_seconds)
        self._monotonic = monotonic
        # (valid until, estimated total of the unfiltered list)
        self._estimate: tuple[float, int] = (-1.0, 0)
        # GetUser's read; the adapters' fast path when wired, else a read-only unit of work.
        self._point_reads = point_reads or UnitOfWorkPointReads(uow)
        self._hasher = hasher
        self._page_tokens = page_tokens
        self._clock = clock
        self._common_passwords = common_passwords
        self._on_tokens_revoked = on_tokens_revoked
        self._creates = IdempotentCreates(
            uow=uow,
            clock=clock,
            fingerprint_key=fingerprint_key,
            ttl_seconds=idempotency_ttl_seconds,
        )
        self._import = UserImport(
            uow=uow,
            hasher=hasher,
            clock=clock,
            creates=self._creates,
            check_new_password=self.check_new_password,
        )

    def check_new_password(self, password: str, field: str) -> FieldViolation | None:
        """The rules of every new password (length, not a common one), for `field`."""
        violation = check_password(password, field)
        if violation is None and password.lower() in self._common_passwords:
            violation = FieldViolation(
                field,
                "password is one of the most common passwords; choose another",
                "COMMON_PASSWORD",
            )
        return violation

    async def create_user(
        self,
        *,
        ctx: RequestContext,
        email: str,
        name: str,
        password: str | None,
        roles: Sequence[str] = (),
        request_id: str = "",
        labels: Mapping[str, str] | None = None,
        admin_metadata: Mapping[str, Any] | None = None,
        password_change_required: bool = False,
    ) -> UserView:
        """Validate every field at once, hash the password, insert; EmailTaken on a duplicate.

        `password=None` makes an account that cannot log in with a password (service accounts).
        With a `request_id`, a retry by the same caller returns the first call's user and
        creates nothing; the same request_id with another payload is refused. A non-empty
        `admin_metadata` needs an admin (PermissionDenied otherwise).
        """
        if admin_metadata and not ctx.actor.is_admin:
            raise PermissionDenied("only admins may set admin_metadata")
        email, email_violation = check_email(email)
        name, name_violation = check_name(name)
        password_violation = (
            self.check_new_password(password, "password") if password is not None else None
        )
        checked_roles, roles_violation = check_roles(roles)
        violations = [
            v for v in (email_violation, name_violation, password_violation, roles_violation) if v
        ]
        checked_labels, label_violations = check_labels(labels or {})
        violations.extend(label_violations)
        metadata, metadata_violation = check_admin_metadata(admin_metadata or {})
        violations.extend([metadata_violation] if metadata_violation else [])
        if request_id:
            _, id_violation = parse_user_id(request_id, "request_id")
            violations.extend([id_violation] if id_violation else [])
        if violations:
            raise ValidationFailed(violations)
        if password_change_required and not ctx.actor.is_admin:
            raise PermissionDenied("only admins may require a password change")
        caller = ctx.actor.audit_name
        key = request_id.lower()
        fingerprint = self._creates.fingerprint(
            email,
            name,
            password,
            checked_roles,
            labels=checked_labels,
            admin_metadata=metadata,
            password_change_required=password_change_required,
        )
        if request_id:
            earlier = await self._creates.remembered(caller, key, fingerprint)
            if earlier is not None:
                return _shown(ctx, earlier)
        password_hash = (
            await self._hasher.hash(password)
            if password is not None
            else SERVICE_ACCOUNT_PASSWORD_HASH
        )
        now = self._clock()
        user = User(
            id=uuid.uuid4(),
            email=email,
            name=name,
            password_hash=password_hash,
            roles=checked_roles,
            state=UserState.ACTIVE,
            create_time=now,
            update_time=now,
            version=1,
            password_change_time=now,
            labels=checked_labels,
            admin_metadata=metadata,
            password_change_required=password_change_required,
        )
        welcome = OutboxMessage(
            topic=TOPIC_USER_CREATED,
            aggregate_id=user.id,
            payload={"user_id": str(user.id), "email": user.email, "name": user.name},
            request_id=ctx.request_id,
            create_time=now,
        )

        async def insert(uow: UnitOfWork) -> UserView:
            if request_id:
                # First, so that a concurrent retry waits on this key (and then answers with
                # our result) instead of failing on the e-mail the first call takes.
                await self._creates.remember(
                    uow,
                    caller=caller,
                    request_id=key,
                    fingerprint=fingerprint,
                    user=user.view(),
                    now=now,
                )
            await uow.users.add(user)
            # Same transaction: no user without its welcome message and audit record.
            # Service accounts (no password) have no mailbox to welcome.
            if password is not None:
                await uow.outbox.add(welcome)
            await uow.user_events.add(user_events.created(user.view(), ctx.request_id, now))
            await uow.audit.add(
                self._event(
                    ctx,
                    user.id,
                    audit.USER_CREATED,
                    {
                        "email": (None, user.email),
                        "name": (None, user.name),
                        "roles": (None, list(user.roles)),
                        "state": (None, user.state.value),
                        "password": (None, "set" if password is not None else None),
                        **created_extras(user),
                    },
                    now,
                )
            )
            await uow.commit()
            return user.view()

        try:
            return _shown(ctx, await in_transaction(self._uow, insert))
        except DuplicateRequest:
            # A concurrent call with the same request_id committed first: answer as it did.
            earlier = await self._creates.remembered(caller, key, fingerprint)
            if earlier is None:
                raise
            return _shown(ctx, earlier)

    async def batch_create_users(
        self,
        *,
        ctx: RequestContext,
        entries: Sequence[NewUserEntry],
        all_or_nothing: bool = False,
        request_id: str = "",
    ) -> list[EntryOutcome]:
        """Create up to 1,000 users, each with a password or an imported hash; one outcome
        per entry in request order (see services.user_import)."""
        if not ctx.actor.is_admin:
            # The contract's policy already refuses this; the rule holds here on its own too.
            raise PermissionDenied("only admins may create users in batches")
        return await self._import.batch_create(
            ctx=ctx, entries=entries, all_or_nothing=all_or_nothing, request_id=request_id
        )

    async def purge_idempotency_keys(self) -> int:
        """Forget request ids older than the retention period; returns how many."""
        return await self._creates.purge()

    async def get_user(self, user_id: str, *, ctx: RequestContext | None = None) -> UserView:
        """The user with this id; ValidationFailed for a malformed id, UserNotFound if none.

        The login counters are shown only when `ctx` is an admin's. A soft-deleted user is
        found by admins only (AIP-164: Get may return it, with its state DELETED); to every
        other caller it does not exist.

        A soft-deleted user is found by admins only (AIP-164: Get may return it, with its
        state DELETED); to every other caller it does not exist.
        """
        uid = require_user_id(user_id)
        admin = ctx is not None and ctx.actor.is_admin
        return _shown(ctx, (await self._stored(uid, show_deleted=admin)).view())

    async def _stored(self, uid: uuid.UUID, *, show_deleted: bool = False) -> User:
        user = await self._point_reads.get(uid)
        if user is None or (user.state is UserState.DELETED and not show_deleted):
            raise UserNotFound(str(uid))
        return user

    async def get_user_by_email(self, email: str) -> UserView | None:
        async with self._uow(write=False) as uow:
            user = await uow.users.get_by_email(normalize_email(email))
        return user.view() if user is not None else None

    async def batch_get_users(
        self, *, ctx: RequestContext, user_ids: Sequence[str], allow_missing: bool = False
    ) -> BatchGetUsersResult:
        """The users with these ids, in request order, duplicates included; one read.

        At most BATCH_GET_MAX ids; one violation per malformed id (`ids[3]`), the first
        REPORTED_MALFORMED_MAX named and the rest counted. Unknown ids: UsersNotFound naming
        them, unless `allow_missing`, which leaves them out and returns them in `missing_ids`.
        A caller without admin or service role may ask only for itself (every id its own).
        """
        if len(user_ids) > BATCH_GET_MAX:
            raise ValidationFailed(
                [
                    FieldViolation(
                        "ids",
                        f"at most {BATCH_GET_MAX} ids per call, got {len(user_ids)}",
                        "TOO_MANY",
                    )
                ]
            )
        parsed: list[uuid.UUID] = []
        violations: list[FieldViolation] = []
        malformed = 0
        for index, raw in enumerate(user_ids):
            uid, violation = parse_user_id(raw, f"ids[{index}]")
            if uid is not None:
                parsed.append(uid)
                continue
            malformed += 1
            if violation is not None and len(violations) < REPORTED_MALFORMED_MAX:
                violations.append(violation)
        if malformed > len(violations):
            violations.append(
                FieldViolation(
                    "ids",
                    f"{malformed - len(violations)} more malformed ids not listed",
                    "INVALID_FORMAT",
                )
            )
        if violations:
            raise ValidationFailed(violations)
        actor = ctx.actor
        if not actor.roles & READ_ANY_ROLES and not all(actor.is_self(u) for u in parsed):
            # The contract's policy already refuses this; the rule holds here on its own too.
            raise PermissionDenied("a user may batch-get only itself")
        stored = await self._point_reads.get_many(set(parsed))
        # Soft-deleted users are missing to all but admins, as in GetUser.
        found = {u.id: u for u in stored if u.state is not UserState.DELETED or actor.is_admin}
        missing = list(dict.fromkeys(u for u in parsed if u not in found))
        if missing and not allow_missing:
            raise UsersNotFound([str(u) for u in missing], limit=REPORTED_IDS_MAX)
        return BatchGetUsersResult(
            users=[_shown(ctx, found[u]) for u in parsed if u in found], missing_ids=missing
        )

    async def list_users(
        self,
        *,
        page_size: int,
        page_token: str,
        email: str,
        filter: str = "",
        show_deleted: bool = False,
        ctx: RequestContext | None = None,
    ) -> ListUsersResult:
        """One page, newest first, with a token for the next page (empty at the end).

        `filter` is the AIP-160 subset of domain.user_filter; `email` is an exact e-mail,
        the same as `email = "..."` in the filter, and ANDed with it. Soft-deleted users are
        left out unless `show_deleted`, which only admins may set.
        """
        if show_deleted and (ctx is None or not ctx.actor.is_admin):
            raise PermissionDenied("only admins may list deleted users")
        violations: list[FieldViolation] = []
        email_filter = normalize_email(email) if email else None
        if email_filter is not None and len(email_filter) > EMAIL_MAX:
            violations.append(
                FieldViolation("email", f"email must be at most {EMAIL_MAX} characters", "TOO_LONG")
            )
        where = UserFilter()
        try:
            where = parse_filter(filter)
        except FilterSyntaxError as err:
            violations.append(err.violation())
        if UserState.DELETED in where.states and not show_deleted:
            violations.append(
                FieldViolation(
                    "filter",
                    "state = DELETED needs show_deleted: deleted users are otherwise left out",
                    "SHOW_DELETED_REQUIRED",
                )
            )
        where = dataclasses.replace(where, show_deleted=show_deleted)
        if email_filter is not None:
            where = _with_email(where, email_filter)
        # Tokens of an unfiltered list keep the form they had before filters existed.
        query = f"email={email_filter or ''}"
        if filter.strip():
            query += f";filter={where.canonical}"
        if show_deleted:
            # A token of a list with deleted users is no token for one without, and back.
            query += ";show_deleted"
        page_request = parse_page_request(
            self._page_tokens,
            page_size=page_size,
            page_token=page_token,
            query=query,
            violations=violations,
        )
        if violations:
            raise ValidationFailed(violations)
        now = self._monotonic()
        unfiltered = where == UserFilter()
        reuse = unfiltered and self._estimate[0] > now
        if reuse:
            # AIP-132: an estimate on large unfiltered lists (an exact COUNT would cost more
            # than the page), reused for a few seconds; the page alone is a point read.
            rows = await self._point_reads.list_page(
                limit=page_request.size + 1, after=page_request.cursor
            )
            total = self._estimate[1]
        else:
            async with self._uow(write=False) as uow:
                rows = await uow.users.list(
                    limit=page_request.size + 1, after=page_request.cursor, where=where
                )
                # Exact when filtered or small.
                total = await uow.users.count(where=where, exact_below=EXACT_COUNT_BELOW)
            if unfiltered and total >= EXACT_COUNT_BELOW:
                self._estimate = (now + ESTIMATE_SECONDS, total)
        page, next_token = cut_page(self._page_tokens, page_request, rows)
        return ListUsersResult(
            users=[_shown(ctx, u.view()) for u in page],
            next_page_token=next_token,
            total_size=total,
        )

    async def update_user(
        self,
        *,
        ctx: RequestContext,
        user_id: str,
        paths: Sequence[str],
        email: str,
        name: str,
        roles: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        admin_metadata: Mapping[str, Any] | None = None,
        etag: str,
        password_change_required: bool = False,
    ) -> UserView:
        """Write the masked fields only; checks etag and bumps the version atomically.

        Only admins may write `roles`, `labels` (also `labels.<key>`), `admin_metadata` and
        `password_change_required`; a change of roles, and setting password_change_required,
        revoke the user's tokens. `labels` replaces the whole map; `labels.<key>` sets that
        label to labels[key], or removes it when labels lacks the key.
        """
        if not ctx.actor.is_admin and admin_only(paths):
            raise PermissionDenied(
                "only admins may change roles, labels, admin_metadata and password_change_required"
            )
        violations: list[FieldViolation] = []
        uid, id_violation = parse_user_id(user_id, "user.id")
        if id_violation:
            violations.append(id_violation)
        update = parse_update_mask(
            paths,
            email=email,
            name=name,
            roles=roles,
            labels=labels,
            admin_metadata=admin_metadata,
            password_change_required=password_change_required,
        )
        violations.extend(update.violations)
        if violations or uid is None:
            raise ValidationFailed(violations)
        derive = None
        if update.label_edits:
            edits = update.label_edits

            def derive(current: User) -> dict[str, Any]:
                merged, violation = merged_labels(current.labels, edits)
                if violation is not None:
                    raise ValidationFailed([violation])
                return {"labels": merged}

        return _shown(
            ctx,
            await self._write(
                ctx, uid, update.values, etag=etag, action=audit.USER_UPDATED, derive=derive
            ),
        )

    async def change_password(
        self,
        *,
        ctx: RequestContext,
        user_id: str,
        current_password: str,
        new_password: str,
        etag: str,
    ) -> UserView:
        """Set a new password and revoke the user's tokens; self must prove the current one."""
        uid = require_user_id(user_id)
        actor = ctx.actor
        if not actor.is_admin and not actor.is_self(uid):
            raise PermissionDenied()
        violation = self.check_new_password(new_password, "new_password")
        if violation is not None:
            raise ValidationFailed([violation])
        if not actor.is_admin:
            await self._check_current_password(ctx, uid, current_password)
        password_hash = await self._hasher.hash(new_password)
        values: dict[str, Any] = {"password_hash": password_hash}
        if actor.is_self(uid):
            # The change the flag asked for. An admin setting someone's password leaves the
            # flag as it is: a temporary password is what the flag is for.
            values["password_change_required"] = False
        changed = await self._write(ctx, uid, values, etag=etag, action=audit.USER_PASSWORD_CHANGED)
        return _shown(ctx, changed)

    async def _check_current_password(
        self, ctx: RequestContext, uid: uuid.UUID, current_password: str
    ) -> None:
        """Verify the caller's current password like Login does: a wrong one counts toward the
        account's lock, and while the account is locked no password is accepted here either,
        so that a stolen access token is not an unlimited password oracle."""
        user = await self._stored(uid)
        now = self._clock()
        locked = user.locked_until is not None and user.locked_until > now
        # Verified even when locked or empty: the answer's timing says nothing either way.
        valid = await self._hasher.verify(user.password_hash, current_password) and bool(
            current_password
        )
        if locked or not valid:

            async def record(uow: UnitOfWork) -> None:
                # Counted, not audited: no change happened (the audit trail records changes
                # and logins); the log line below records the attempt.
                if not locked:
                    await uow.users.record_login_failure(
                        uid, now=now, max_failures=self._max_failures, lock_until=now + self._lock
                    )
                await uow.commit()

            await in_transaction(self._uow, record)
            log.warning(
                "current password refused",
                extra={"user_id": str(uid), "outcome": "locked" if locked else "wrong_password"},
            )
            raise ValidationFailed(
                [FieldViolation("current_password", "current password is wrong", "WRONG_PASSWORD")]
            )
        if user.failed_login_count or user.locked_until is not None:

            async def reset(uow: UnitOfWork) -> None:
                await uow.users.reset_login_failures(uid)
                await uow.commit()

            await in_transaction(self._uow, reset)

    async def disable_user(self, *, ctx: RequestContext, user_id: str, etag: str) -> UserView:
        """Disable; FailedPrecondition if already disabled. Revokes the user's tokens."""
        uid = require_user_id(user_id)
        return await self._write(
            ctx,
            uid,
            {"state": UserState.DISABLED.value},
            etag=etag,
            require_state=UserState.ACTIVE,
            action=audit.USER_DISABLED,
        )

    async def enable_user(self, *, ctx: RequestContext, user_id: str, etag: str) -> UserView:
        """Enable; FailedPrecondition if already active."""
        uid = require_user_id(user_id)
        return await self._write(
            ctx,
            uid,
            {"state": UserState.ACTIVE.value},
            etag=etag,
            require_state=UserState.DISABLED,
            action=audit.USER_ENABLED,
        )

    async def unlock_user(self, *, ctx: RequestContext, user_id: str, etag: str) -> UserView:
        """Clear the login lock and the failure counter (admins); audited, new etag. A user
        with neither is left as it is (no audit record, same etag)."""
        uid = require_user_id(user_id)
        if not ctx.actor.is_admin:
            # The contract's policy already refuses this; the rule holds here on its own too.
            raise PermissionDenied("only admins may unlock users")
        return await self._write(
            ctx,
            uid,
            {"failed_login_count": 0, "locked_until": None},
            etag=etag,
            action=audit.USER_UNLOCKED,
        )

    async def disable_dormant_users(
        self, *, days: int, batch_size: int = DORMANT_BATCH, max_batches: int = DORMANT_BATCHES
    ) -> int:
        """Disable every active user (service accounts aside) whose last login, or creation
        if it never logged in, is more than `days` days old; returns how many were disabled.

        Each user is disabled as DisableUser does it (audit record by the system actor, token
        revocation, refresh tokens revoked), in its own transaction, after checking again
        under the row lock that it is still dormant: a login in between keeps it active. At
        most batch_size x max_batches users per call; the next call goes on.
        """
        if days <= 0:
            return 0
        ctx = RequestContext(SYSTEM, request_id=f"dormant-{uuid.uuid4()}")
        disabled = 0
        for _ in range(max_batches):
            cutoff = self._clock() - timedelta(days=days)
            async with self._uow(write=False) as uow:
                candidates = await uow.users.dormant(cutoff=cutoff, limit=batch_size)
            progress = False
            for candidate in candidates:
                if not self._hasher.allows_password_login(candidate.password_hash):
                    continue

                def still_dormant(current: User, cutoff: datetime = cutoff) -> None:
                    seen = current.last_login_time or current.create_time
                    if seen >= cutoff:
                        raise FailedPrecondition("user logged in since", reason="NOT_DORMANT")

                try:
                    await self._write(
                        ctx,
                        candidate.id,
                        {"state": UserState.DISABLED.value},
                        etag="",
                        require_state=UserState.ACTIVE,
                        action=audit.USER_DISABLED,
                        check=still_dormant,
                        note={"reason": (None, DORMANT_REASON)},
                    )
                except (FailedPrecondition, UserNotFound):
                    continue  # changed meanwhile: logged in, disabled or deleted
                disabled += 1
                progress = True
                log.info(
                    "disabled dormant user",
                    extra={"user_id": str(candidate.id), "days": days},
                )
            if len(candidates) < batch_size or not progress:
                break
        return disabled

    async def add_roles(
        self,
        *,
        user_id: uuid.UUID,
        roles: Sequence[str],
        ctx: RequestContext = OPERATOR,
    ) -> UserView:
        """Grant roles (operator tooling); revokes tokens so new ones carry the roles."""
        current = await self.get_user(str(user_id))
        merged = sorted(set(current.roles) | set(roles))
        if tuple(merged) == current.roles:
            return current
        return await self._write(
            ctx, user_id, {"roles": merged}, etag="", action=audit.USER_UPDATED
        )

    async def delete_user(self, *, ctx: RequestContext, user_id: str, etag: str = "") -> None:
        """Soft-delete (AIP-164): state DELETED with delete_time and purge_time (now plus the
        retention period); revokes the user's tokens. The row stays, so its e-mail stays
        taken, until `purge_deleted_users` removes it. UserNotFound if absent or already
        deleted, EtagMismatch if a given etag is stale.
        """
        uid = require_user_id(user_id)
        expected = self._expected_version(etag)

        async def delete(uow: UnitOfWork) -> None:
            current = await uow.users.get(uid, for_update=True)
            if current is None or current.state is UserState.DELETED:
                raise UserNotFound(str(uid))
            if expected is not None and current.version != expected:
                raise EtagMismatch()
            now = self._clock()
            purge_time = now + self._retention
            updated = await uow.users.update(
                uid,
                {
                    "state": UserState.DELETED.value,
                    "deleted_from_state": current.state.value,
                    "delete_time": now,
                    "purge_time": purge_time,
                    "update_time": now,
                },
                expected_version=current.version,
                revoke_tokens=True,
            )
            if updated is None:
                raise EtagMismatch()  # guard only: the row is locked
            await uow.refresh_tokens.revoke_user(uid)
            # The feed's "deleted": the user as it is now (state DELETED, its purge time).
            await uow.user_events.add(
                change_of(audit.USER_DELETED, updated.view(), ["state"], ctx.request_id, now)
            )
            await uow.audit.add(
                self._event(
                    ctx,
                    uid,
                    audit.USER_DELETED,
                    {
                        "state": (current.state.value, UserState.DELETED.value),
                        "purge_time": (None, purge_time.isoformat()),
                    },
                    now,
                )
            )
            await uow.commit()

        await in_transaction(self._uow, delete)
        self._on_tokens_revoked(uid)

    async def undelete_user(self, *, ctx: RequestContext, user_id: str, etag: str = "") -> UserView:
        """Restore a soft-deleted user to the state it had when deleted (a disabled user
        stays disabled) and clear delete_time and purge_time. Tokens revoked by the deletion
        stay revoked. UserNotFound if absent (or purged), FailedPrecondition if not deleted,
        EtagMismatch if a given etag is stale.
        """
        uid = require_user_id(user_id)
        expected = self._expected_version(etag)

        async def undelete(uow: UnitOfWork) -> User:
            current = await uow.users.get(uid, for_update=True)
            if current is None:
                raise UserNotFound(str(uid))
            if expected is not None and current.version != expected:
                raise EtagMismatch()
            if current.state is not UserState.DELETED:
                raise FailedPrecondition("user is not deleted", reason="USER_NOT_DELETED")
            restored = current.deleted_from_state or UserState.ACTIVE
            now = self._clock()
            updated = await uow.users.update(
                uid,
                {
                    "state": restored.value,
                    "deleted_from_state": None,
                    "delete_time": None,
                    "purge_time": None,
                    "update_time": now,
                },
                expected_version=current.version,
                # Old tokens are dead already; the new token version makes every replica
                # re-read the state at the first new token instead of serving a cached
                # "not active" for a few seconds.
                revoke_tokens=True,
            )
            if updated is None:
                raise EtagMismatch()  # guard only: the row is locked
            # The feed has no type of its own for this: an "updated" event naming "state".
            await uow.user_events.add(
                change_of(audit.USER_UNDELETED, updated.view(), ["state"], ctx.request_id, now)
            )
            await uow.audit.add(
                self._event(
                    ctx,
                    uid,
                    audit.USER_UNDELETED,
                    {"state": (UserState.DELETED.value, restored.value)},
                    now,
                )
            )
            await uow.commit()
            return updated

        restored = await in_transaction(self._uow, undelete)
        self._on_tokens_revoked(uid)
        return _shown(ctx, restored.view())

    async def purge_deleted_users(self, *, batch: int = 100) -> int:
        """Remove for good every soft-deleted user whose purge time has passed; how many.

        Each user goes in its own transaction: the row (its refresh tokens cascade, its
        e-mail becomes free), the e-mail and name values in its audit trail replaced by a
        marker (the one sanctioned rewrite of audit rows), and a "user.purged" event by
        "system". A user undeleted or purged by another replica meanwhile is skipped.
        """
        ctx = RequestContext(SYSTEM, request_id=f"purge-{uuid.uuid4()}")
        purged = 0
        while True:
            now = self._clock()
            async with self._uow(write=False) as uow:
                due = await uow.users.list_purgeable(now=now, limit=batch)
            done = 0
            for uid in due:
                done += await in_transaction(
                    self._uow, functools.partial(self._purge_one, ctx=ctx, uid=uid, now=now)
                )
            purged += done
            # A full batch of which some were skipped (undeleted meanwhile) ends this run too.
            if len(due) < batch or done < len(due):
                return purged

    async def _purge_one(
        self, uow: UnitOfWork, *, ctx: RequestContext, uid: uuid.UUID, now: datetime
    ) -> int:
        current = await uow.users.get(uid, for_update=True)
        if (
            current is None
            or current.state is not UserState.DELETED
            or current.purge_time is None
            or current.purge_time > now
        ):
            return 0
        if not await uow.users.delete(uid, expected_version=current.version):
            return 0  # guard only: the row is locked
        tombstoned = await uow.audit.tombstone_user(uid)
        await uow.audit.add(
            self._event(
                ctx,
                uid,
                audit.USER_PURGED,
                {"state": (UserState.DELETED.value, None)},
                now,
            )
        )
        await uow.commit()
        log.info("purged deleted user", extra={"user_id": str(uid), "audit_events": tombstoned})
        return 1

    async def _write(
        self,
        ctx: RequestContext,
        uid: uuid.UUID,
        values: dict[str, Any],
        *,
        etag: str,
        action: str,
        require_state: UserState | None = None,
        check: Callable[[User], None] | None = None,
        note: dict[str, tuple[Any, Any]] | None = None,
        derive: Callable[[User], dict[str, Any]] | None = None,
    ) -> UserView:
        """Apply `values` with the etag and state checks, the audit record and, where the
        change affects what tokens may do (password, roles, state), token revocation, all in
        one transaction. `check` may refuse the stored user (under its row lock) by raising;
        `note` adds entries to the audit record; `derive` adds values computed from the
        stored user under its row lock (single-label edits)."""
        expected = self._expected_version(etag)

        async def write(uow: UnitOfWork) -> tuple[User, bool]:
            current = await uow.users.get(uid, for_update=True)
            if current is None or current.state is UserState.DELETED:
                # A soft-deleted user is changed only by UndeleteUser.
                raise UserNotFound(str(uid))
            if expected is not None and current.version != expected:
                raise EtagMismatch()
            if require_state is not None and current.state is not require_state:
                raise FailedPrecondition(
                    f"user is already {current.state.value}",
                    reason="USER_ALREADY_" + current.state.value.upper(),
                )
            if check is not None:
                check(current)
            wanted = {**values, **derive(current)} if derive is not None else values
            changes = _changes(current, wanted)
            if not changes and require_state is None:
                # Nothing would change: no new version, no audit record (AIP-134 allows it).
                return current, False
            # Setting password_change_required too: every session must log in again and get
            # the restricted token.
            revoke = (
                bool({"password_hash", "state"} & set(wanted))
                or "roles" in changes
                or changes.get("password_change_required") == (False, True)
            )
            now = self._clock()
            written = {**wanted, "update_time": now}
            if "password_hash" in wanted:
                written["password_change_time"] = now
                # A recovery code mailed earlier would set the password again, over this one.
                await uow.one_time_codes.supersede(uid, CodePurpose.RECOVER_PASSWORD, now=now)
            if "email" in changes:
                # A new address is unproven; codes mailed to the old one stop working.
                await uow.one_time_codes.supersede(uid, CodePurpose.VERIFY_EMAIL, now=now)
                if current.email_verified:
                    written["email_verified"] = False
                    changes["email_verified"] = (True, False)
            # The row is locked (SQLite: the write lock is held), so the version still matches;
            # the condition stays in the statement as a guard all the same.
            updated = await uow.users.update(
                uid,
                written,
                expected_version=current.version,
                revoke_tokens=revoke,
            )
            if updated is None:
                raise EtagMismatch()
            if revoke:
                await uow.refresh_tokens.revoke_user(uid)
            event_action = audit.USER_ROLES_CHANGED if "roles" in changes else action
            await uow.user_events.add(
                change_of(event_action, updated.view(), list(changes), ctx.request_id, now)
            )
            await uow.audit.add(
                self._event(ctx, uid, event_action, {**changes, **(note or {})}, now)
            )
            await uow.commit()
            return updated, revoke

        updated, revoked = await in_transaction(self._uow, write)
        if revoked:
            self._on_tokens_revoked(uid)
        return updated.view()

    @staticmethod
    def _event(
        ctx: RequestContext,
        user_id: uuid.UUID,
        action: str,
        changes: dict[str, tuple[Any, Any]],
        now: datetime,
    ) -> AuditEvent:
        return change_event(
            user_id=user_id,
            action=action,
            changes=changes,
            actor=ctx.actor.audit_name,
            request_id=ctx.request_id,
            now=now,
        )

    @staticmethod
    def _expected_version(etag: str) -> int | None:
        if not etag:
            return None
        if not is_etag_like(etag):
            raise ValidationFailed(
                [
                    FieldViolation(
                        "etag",
                        f"etag must be at most {ETAG_MAX} printable ASCII characters",
                        "INVALID_FORMAT",
                    )
                ]
            )
        version = version_of_etag(etag)
        # Never issued by us, so it cannot match any version; existence is still checked first.
        return -1 if version is None else version


def created_extras(user: User) -> dict[str, tuple[Any, Any]]:
    """The audit changes of a created user's labels, admin_metadata and
    password_change_required, when it has them."""
    extras: dict[str, tuple[Any, Any]] = {}
    if user.password_change_required:
        extras["password_change_required"] = (None, True)
    if user.labels:
        extras["labels"] = (None, dict(user.labels))
    if user.admin_metadata:
        extras["admin_metadata"] = (None, dict(user.admin_metadata))
    return extras


def _with_email(where: UserFilter, email: str) -> UserFilter:
    """`where` AND email = `email`."""
    if where.email is not None and where.email != email:
        return dataclasses.replace(where, impossible=True)
    return dataclasses.replace(where, email=email)


def _changes(current: User, values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for the values that differ from the stored user."""
    changes: dict[str, tuple[Any, Any]] = {}
    for name, new in values.items():
        if name == "password_hash":
            changes["password"] = ("[set]", "[changed]")
            continue
        old: Any = getattr(current, name)
        if name == "roles":
            old, new = list(old), list(new)
        elif name in ("labels", "admin_metadata"):
            old, new = dict(old), dict(new)
        elif name == "state":
            old = old.value
        # Audit values are JSON: times as RFC 3339 text.
        if isinstance(old, datetime):
            old = old.isoformat()
        if isinstance(new, datetime):
            new = new.isoformat()
        if old != new:
            changes[name] = (old, new)
    return changes


def _shown(ctx: RequestContext | None, user: UserView) -> UserView:
    """The user as this caller may see it: the login counters and admin_metadata are for
    admins only."""
    if ctx is not None and ctx.actor.is_admin:
        return user
    return user.for_non_admin()
