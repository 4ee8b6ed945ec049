"""Every store behaves alike on the fake, SQLite and PostgreSQL.

The service layer's unit tests run on the fakes; these tests are what entitles them to.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from tests.unit.fakes import FakeUnitOfWorkFactory
from usersvc.adapters.tables import outbox
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain.audit import AuditEvent
from usersvc.domain.errors import AlreadyExists, DuplicateRequest, EmailLookalike, EmailTaken
from usersvc.domain.events import OutboxMessage
from usersvc.domain.models import (
    SERVICE_ACCOUNT_PASSWORD_HASH,
    PageCursor,
    User,
    UserState,
    UserView,
)
from usersvc.domain.records import RefreshTokenStatus
from usersvc.domain.user_filter import UserFilter, parse_filter
from usersvc.services.ports import UnitOfWorkFactory, UserPointReads

# In the past, so that nothing here is ever the newest row another test on the same
# database lists, and no pending outbox row waits for anyone's dispatcher.
NOW = datetime(1991, 5, 4, 12, 0, tzinfo=UTC)

# Days handed out by _day_of_its_own, one sequence for the whole session.
_DAYS_GIVEN = itertools.count()


def _day_of_its_own() -> datetime:
    """A day no other test of the session writes to, so a filter bounded to it sees only this
    test's users (the session's databases are shared).

    Handed out in sequence, not drawn: some thirty tests drawing from 30,000 days at random
    met on one day in about one full run in twenty, and the later one listed the earlier
    one's users too. Every other day, and long before NOW: a test may write just outside
    its day (a microsecond before it), and nothing else writes that long ago.
    """
    return datetime(1801, 1, 1, tzinfo=UTC) + timedelta(days=2 * next(_DAYS_GIVEN))


def new_user(**overrides: Any) -> User:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email": f"{uuid.uuid4().hex}@example.com",
        "name": "Contract Test",
        "password_hash": "$argon2id$contract-test",
        "roles": (),
        "state": UserState.ACTIVE,
        "create_time": NOW,
        "update_time": NOW,
        "version": 1,
    }
    values.update(overrides)
    return User(**values)


async def add(stores: UnitOfWorkFactory, *users: User) -> None:
    async with stores() as tx:
        for user in users:
            await tx.users.add(user)
        await tx.commit()


async def stored(stores: UnitOfWorkFactory, user_id: uuid.UUID) -> User | None:
    async with stores(write=False) as tx:
        return await tx.users.get(user_id)


# --- users ---------------------------------------------------------------------------------


async def test_a_user_reads_back_as_written(stores: UnitOfWorkFactory) -> None:
    user = new_user(roles=("admin", "service"), locked_until=NOW + timedelta(minutes=5))
    await add(stores, user)
    assert await stored(stores, user.id) == user
    async with stores(write=False) as tx:
        assert await tx.users.get_by_email(user.email) == user
        assert await tx.users.get_by_email(f"missing-{user.email}") is None
        assert await tx.users.count(where=UserFilter(email=user.email)) == 1
        assert await tx.users.auth_state(user.id) == (1, UserState.ACTIVE)
        assert await tx.users.auth_state(uuid.uuid4()) is None


async def test_point_reads_answer_as_the_store_does_and_see_each_commit(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    """The per-call fast path (raw driver, no unit of work) decodes rows exactly as the
    store does, and a committed change is visible to the very next read."""
    user = new_user(
        roles=("service",),
        create_time=NOW.replace(microsecond=123456),
        locked_until=NOW + timedelta(minutes=5),
    )
    plain = new_user(state=UserState.DISABLED, token_version=7)
    await add(stores, user, plain)
    assert await point_reads.get(user.id) == await stored(stores, user.id) == user
    assert await point_reads.get(plain.id) == plain
    assert await point_reads.auth_state(plain.id) == (7, UserState.DISABLED)
    assert await point_reads.get(uuid.uuid4()) is None
    assert await point_reads.auth_state(uuid.uuid4()) is None
    async with stores() as tx:
        await tx.users.update(user.id, {"name": "Renamed"}, revoke_tokens=True)
        await tx.commit()
    assert (await point_reads.auth_state(user.id)) == (2, UserState.ACTIVE)
    renamed = await point_reads.get(user.id)
    assert renamed is not None and renamed.name == "Renamed" and renamed.version == 2


async def test_point_reads_get_by_email_as_the_store_does(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    """Login's read, without a unit of work: the same user (hash included) as the store's,
    deleted and service accounts too, and None for an address nobody has."""
    plain = new_user(labels={"team": "billing"})
    deleted = new_user(state=UserState.DELETED, delete_time=NOW, purge_time=NOW)
    service = new_user(roles=("service",), password_hash=SERVICE_ACCOUNT_PASSWORD_HASH)
    await add(stores, plain, deleted, service)
    for user in (plain, deleted, service):
        async with stores(write=False) as tx:
            expected = await tx.users.get_by_email(user.email)
        assert await point_reads.get_by_email(user.email) == expected == user
    assert await point_reads.get_by_email(f"nobody-{uuid.uuid4().hex}@example.com") is None
    # Exact: normalising the address is the service's job.
    assert await point_reads.get_by_email(plain.email.upper()) is None


async def test_point_reads_get_many_as_the_store_does(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    """BatchGetUsers' read, one statement for any number of ids, without a unit of work."""
    plain = new_user(roles=("service",), labels={"team": "billing"})
    deleted = new_user(state=UserState.DELETED, delete_time=NOW, purge_time=NOW)
    await add(stores, plain, deleted)
    ids = {plain.id, deleted.id, uuid.uuid4()}
    async with stores(write=False) as tx:
        expected = await tx.users.get_many(ids)
    found = await point_reads.get_many(ids)
    # As views: a batch read never carries the password hashes.
    assert sorted(found, key=lambda u: u.id) == sorted(
        (u.view() for u in expected), key=lambda u: u.id
    )
    assert sorted(found, key=lambda u: u.id) == sorted(
        [plain.view(), deleted.view()], key=lambda u: u.id
    )
    assert all(type(u) is UserView for u in found)
    assert await point_reads.get_many(set()) == []
    assert await point_reads.get_many({uuid.uuid4() for _ in range(1000)}) == []


async def test_a_point_read_page_is_the_stores_unfiltered_page(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    """ListUsers' fast path (an unfiltered page without a unit of work) returns what the
    store's list does: list order, keyset after the cursor, deleted users left out."""
    # A window of time of this test's own, found behind a cursor at its end.
    top = _day_of_its_own() + timedelta(hours=1)
    newest, same_time, deleted, oldest = (
        new_user(create_time=top - timedelta(seconds=1)),
        new_user(create_time=top - timedelta(seconds=2), roles=("admin",)),
        new_user(create_time=top - timedelta(seconds=2), state=UserState.DELETED),
        new_user(create_time=top - timedelta(seconds=3), locked_until=NOW),
    )
    await add(stores, newest, same_time, deleted, oldest)
    start = PageCursor(create_time=top, id=uuid.uuid4())
    async with stores(write=False) as tx:
        expected = await tx.users.list(limit=3, after=start, where=UserFilter())
    page = await point_reads.list_page(limit=3, after=start)
    assert list(page) == list(expected)
    assert [u.id for u in page] == [newest.id, same_time.id, oldest.id]
    rest = await point_reads.list_page(
        limit=1, after=PageCursor(create_time=same_time.create_time, id=same_time.id)
    )
    assert [u.id for u in rest] == [oldest.id]
    first = await point_reads.list_page(limit=2, after=None)
    async with stores(write=False) as tx:
        assert list(first) == list(await tx.users.list(limit=2, after=None, where=UserFilter()))


async def test_an_email_is_unique_and_the_failed_insert_leaves_nothing(
    stores: UnitOfWorkFactory,
) -> None:
    first = new_user()
    await add(stores, first)
    second = new_user(email=first.email)
    with pytest.raises(EmailTaken):
        await add(stores, second)
    assert await stored(stores, second.id) is None


async def test_a_look_alike_email_is_refused_as_such_and_leaves_nothing(
    stores: UnitOfWorkFactory,
) -> None:
    local = uuid.uuid4().hex[:8]
    first = new_user(email=f"bob-{local}@example.com")
    await add(stores, first)
    look_alike = new_user(email=f"b\u043eb-{local}@example.com")  # Cyrillic o
    with pytest.raises(EmailLookalike):
        await add(stores, look_alike)
    assert await stored(stores, look_alike.id) is None
    # The transaction stays usable after the refused insert: the next user goes in.
    other = new_user()
    async with stores() as tx:
        with pytest.raises(EmailTaken):
            await tx.users.add(new_user(email=first.email))
        await tx.users.add(other)
        await tx.commit()
    assert await stored(stores, other.id) == other


async def test_many_users_go_in_at_once_with_their_audit_and_outbox_rows(
    stores: UnitOfWorkFactory,
) -> None:
    batch = [new_user(roles=("service",) if n % 2 else ()) for n in range(5)]
    events = [
        AuditEvent(
            user_id=u.id,
            action="user.created",
            changes={"email": {"old": None, "new": u.email}},
            actor="system",
            request_id="req-batch",
            create_time=NOW,
        )
        for u in batch
    ]
    messages = [
        OutboxMessage(
            topic=f"contract-{uuid.uuid4().hex}",
            aggregate_id=u.id,
            payload={"email": u.email},
            request_id="req-batch",
            create_time=NOW,
        )
        for u in batch
    ]
    async with stores() as tx:
        await tx.users.add_many(batch)
        await tx.audit.add_many(events)
        await tx.outbox.add_many(messages)
        await tx.users.add_many([])
        await tx.commit()
    for user in batch:
        assert await stored(stores, user.id) == user
    async with stores(write=False) as tx:
        for user, event in zip(batch, events, strict=True):
            assert await tx.audit.list(limit=5, after=None, user_id=user.id) == [event]


async def test_a_taken_email_fails_the_whole_multi_row_insert(stores: UnitOfWorkFactory) -> None:
    first = new_user()
    await add(stores, first)
    batch = [new_user(), new_user(email=first.email)]

    async def add_all() -> None:
        async with stores() as tx:
            await tx.users.add_many(batch)
            await tx.commit()

    # Which unique index speaks first (e-mail or its skeleton) is the database's choice.
    with pytest.raises(AlreadyExists):
        await add_all()
    assert await stored(stores, batch[0].id) is None


async def test_email_conflicts_name_taken_and_look_alike_addresses(
    stores: UnitOfWorkFactory,
) -> None:
    local = uuid.uuid4().hex[:8]
    taken = new_user(email=f"bob-{local}@example.com")
    await add(stores, taken)
    look_alike = f"b\u043eb-{local}@example.com"  # Cyrillic o
    free = f"free-{local}@example.com"
    async with stores(write=False) as tx:
        assert await tx.users.email_conflicts([taken.email, look_alike, free]) == {
            taken.email: True,
            look_alike: False,
        }
        assert await tx.users.email_conflicts([]) == {}


async def test_nothing_is_kept_without_a_commit(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    async with stores() as tx:
        await tx.users.add(user)
    assert await stored(stores, user.id) is None


async def test_update_checks_the_version_and_bumps_it(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    await add(stores, user)
    later = NOW + timedelta(seconds=1)
    async with stores() as tx:
        stale = await tx.users.update(user.id, {"name": "Stale"}, expected_version=user.version + 1)
        updated = await tx.users.update(
            user.id, {"name": "Fresh", "update_time": later}, expected_version=user.version
        )
        await tx.commit()
    assert stale is None
    assert updated == dataclasses.replace(user, name="Fresh", update_time=later, version=2)
    assert await stored(stores, user.id) == updated


async def test_update_with_revocation_bumps_the_token_version(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    await add(stores, user)
    async with stores() as tx:
        updated = await tx.users.update(
            user.id, {"roles": ["admin"], "state": "disabled"}, revoke_tokens=True
        )
        await tx.commit()
    assert updated is not None
    assert (updated.roles, updated.state) == (("admin",), UserState.DISABLED)
    assert (updated.version, updated.token_version) == (2, 2)


async def test_update_refuses_columns_outside_the_allowlist(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    await add(stores, user)
    async with stores() as tx:
        with pytest.raises(ValueError, match="not writable"):
            await tx.users.update(user.id, {"version": 99})


async def test_an_update_to_a_taken_email_is_refused(stores: UnitOfWorkFactory) -> None:
    first, second = new_user(), new_user()
    await add(stores, first, second)
    with pytest.raises(EmailTaken):
        await _update(stores, second.id, {"email": first.email})
    assert await stored(stores, second.id) == second


async def _update(stores: UnitOfWorkFactory, user_id: uuid.UUID, values: dict[str, Any]) -> None:
    async with stores() as tx:
        await tx.users.update(user_id, values)
        await tx.commit()


async def test_delete_checks_the_version(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    await add(stores, user)
    async with stores() as tx:
        assert not await tx.users.delete(user.id, expected_version=7)
        assert await tx.users.delete(user.id, expected_version=1)
        assert not await tx.users.delete(user.id)
        await tx.commit()
    assert await stored(stores, user.id) is None


async def test_list_is_newest_first_with_the_id_as_tiebreaker(stores: UnitOfWorkFactory) -> None:
    # On a day of its own, so that no other test's users fall between these.
    base = _day_of_its_own()
    made = [new_user(create_time=base + timedelta(seconds=n // 2)) for n in range(5)]
    await add(stores, *made)
    expected = sorted(made, key=lambda u: (u.create_time, u.id), reverse=True)
    start = PageCursor(create_time=base + timedelta(seconds=3), id=uuid.uuid4())
    async with stores(write=False) as tx:
        first = await tx.users.list(limit=3, after=start, where=UserFilter())
        rest = await tx.users.list(
            limit=2,
            after=PageCursor(create_time=first[-1].create_time, id=first[-1].id),
            where=UserFilter(),
        )
        only = await tx.users.list(limit=10, after=None, where=UserFilter(email=made[2].email))
    assert [u.id for u in [*first, *rest]] == [u.id for u in expected]
    assert only == [made[2]]


async def test_login_failures_count_lock_and_start_again_after_the_lock(
    stores: UnitOfWorkFactory,
) -> None:
    """The fake's copy of the SQL CASE: count, lock at the maximum, leave a locked account
    alone, and after the lock ran out count again from one."""
    user = new_user()
    await add(stores, user)
    lock_until = NOW + timedelta(minutes=15)

    async def fail(at: datetime, until: datetime = lock_until) -> tuple[int, datetime | None]:
        async with stores() as tx:
            await tx.users.record_login_failure(user.id, now=at, max_failures=3, lock_until=until)
            await tx.commit()
        current = await stored(stores, user.id)
        assert current is not None
        return current.failed_login_count, current.locked_until

    assert await fail(NOW) == (1, None)
    assert await fail(NOW) == (2, None)
    assert await fail(NOW) == (3, lock_until)
    # Attempts during the lock neither count nor extend it.
    assert await fail(NOW + timedelta(minutes=1), NOW + timedelta(hours=1)) == (3, lock_until)
    # After the lock: the count starts again and the lock is gone.
    assert await fail(lock_until + timedelta(seconds=1)) == (1, None)
    async with stores() as tx:
        await tx.users.reset_login_failures(user.id)
        await tx.users.replace_password_hash(user.id, "$argon2id$rehashed")
        await tx.commit()
    after = await stored(stores, user.id)
    assert after is not None
    assert (after.failed_login_count, after.locked_until) == (0, None)
    # A re-hash is not a change of the user: no new version.
    assert (after.password_hash, after.version) == ("$argon2id$rehashed", 1)


# --- refresh tokens ------------------------------------------------------------------------


async def test_refresh_tokens_rotate_once_and_revoke_by_family_and_user(
    stores: UnitOfWorkFactory,
) -> None:
    user = new_user()
    await add(stores, user)
    family, other_family = uuid.uuid4(), uuid.uuid4()
    hashes = [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(3)]
    expires = NOW + timedelta(days=30)
    async with stores() as tx:
        for token_hash, fam in zip(hashes, (family, family, other_family), strict=True):
            await tx.refresh_tokens.add(
                token_hash=token_hash, user_id=user.id, family_id=fam, now=NOW, expire_time=expires
            )
        await tx.commit()
    async with stores() as tx:
        record = await tx.refresh_tokens.get_by_hash(hashes[0])
        assert record is not None
        assert (record.user_id, record.family_id, record.status, record.expire_time) == (
            user.id,
            family,
            RefreshTokenStatus.ACTIVE,
            expires,
        )
        assert await tx.refresh_tokens.mark_used(record.id)
        assert not await tx.refresh_tokens.mark_used(record.id)
        assert await tx.refresh_tokens.get_by_hash("0" * 64) is None
        await tx.refresh_tokens.revoke_family(family)
        await tx.commit()

    async def statuses() -> list[RefreshTokenStatus | None]:
        async with stores(write=False) as tx:
            found = [await tx.refresh_tokens.get_by_hash(h) for h in hashes]
        return [r.status if r else None for r in found]

    revoked = RefreshTokenStatus.REVOKED
    assert await statuses() == [revoked, revoked, RefreshTokenStatus.ACTIVE]
    async with stores() as tx:
        await tx.refresh_tokens.revoke_user(user.id)
        await tx.commit()
    assert await statuses() == [revoked, revoked, revoked]
    # Deleting the user deletes its tokens (the foreign key cascades).
    async with stores() as tx:
        assert await tx.users.delete(user.id)
        await tx.commit()
    assert await statuses() == [None, None, None]


# --- audit ---------------------------------------------------------------------------------


async def test_audit_events_outlive_their_user_and_list_newest_first(
    stores: UnitOfWorkFactory,
) -> None:
    user = new_user()
    await add(stores, user)
    events = [
        AuditEvent(
            user_id=user.id,
            action="user.updated",
            changes={"name": {"old": f"n{n}", "new": f"n{n + 1}"}},
            actor="system",
            request_id=f"req-{n}",
            create_time=NOW + timedelta(seconds=n // 2),
        )
        for n in range(4)
    ]
    async with stores() as tx:
        for event in events:
            await tx.audit.add(event)
        assert await tx.users.delete(user.id)
        await tx.commit()
    expected = sorted(events, key=lambda e: (e.create_time, e.id), reverse=True)
    async with stores(write=False) as tx:
        first = await tx.audit.list(limit=3, after=None, user_id=user.id)
        rest = await tx.audit.list(
            limit=3,
            after=PageCursor(create_time=first[-1].create_time, id=first[-1].id),
            user_id=user.id,
        )
    assert [*first, *rest] == expected


# --- idempotency keys ----------------------------------------------------------------------


async def _remember(stores: UnitOfWorkFactory, caller: str, request_id: str) -> None:
    async with stores() as tx:
        await tx.idempotency.add(
            caller=caller, request_id=request_id, fingerprint="0" * 64, result={}, now=NOW
        )
        await tx.commit()


async def test_idempotency_keys_are_unique_per_caller_and_expire(
    stores: UnitOfWorkFactory,
) -> None:
    caller, request_id = f"caller-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    created = datetime(1981, 1, 1, tzinfo=UTC)
    result = {"id": str(uuid.uuid4()), "roles": ["admin"], "version": 1}
    async with stores() as tx:
        await tx.idempotency.add(
            caller=caller, request_id=request_id, fingerprint="f" * 64, result=result, now=created
        )
        await tx.idempotency.add(
            caller=f"{caller}-other",
            request_id=request_id,
            fingerprint="e" * 64,
            result={},
            now=created,
        )
        await tx.commit()
    with pytest.raises(DuplicateRequest):
        await _remember(stores, caller, request_id)
    async with stores(write=False) as tx:
        record = await tx.idempotency.get(caller=caller, request_id=request_id)
        assert await tx.idempotency.get(caller=caller, request_id=str(uuid.uuid4())) is None
    assert record is not None
    assert (record.fingerprint, record.result, record.create_time) == ("f" * 64, result, created)
    async with stores() as tx:
        # Not expired yet at this cutoff: kept.
        await tx.idempotency.delete_expired(caller=caller, request_id=request_id, cutoff=created)
        assert await tx.idempotency.get(caller=caller, request_id=request_id) is not None
        await tx.idempotency.delete_expired(
            caller=caller, request_id=request_id, cutoff=created + timedelta(seconds=1)
        )
        assert await tx.idempotency.get(caller=caller, request_id=request_id) is None
        # Only keys from before 1982 are this test's: the other caller's one.
        assert await tx.idempotency.purge_older_than(datetime(1981, 6, 1, tzinfo=UTC)) == 1
        await tx.commit()


# --- outbox --------------------------------------------------------------------------------


async def test_outbox_claims_are_leased_fenced_and_settled(stores: UnitOfWorkFactory) -> None:
    topic = f"contract.{uuid.uuid4().hex[:12]}"
    kept, gone = new_user(), new_user()
    await add(stores, kept, gone)
    messages = [
        OutboxMessage(
            topic=topic,
            aggregate_id=user.id,
            payload={"n": n},
            request_id=f"req-{n}",
            create_time=NOW + timedelta(seconds=n),
        )
        for n, user in enumerate((kept, gone))
    ]
    async with stores() as tx:
        for message in messages:
            await tx.outbox.add(message)
        assert await tx.users.delete(gone.id)
        await tx.commit()
    lease = NOW + timedelta(minutes=1)

    async def claim(at: datetime, until: datetime, topics: list[str] | None = None) -> list[Any]:
        async with stores() as tx:
            claimed = await tx.outbox.claim_due(
                topics=topics or [topic], now=at, lease_until=until, limit=10
            )
            await tx.commit()
        return claimed

    assert await claim(NOW - timedelta(seconds=1), lease) == []  # not due yet
    assert await claim(NOW, lease, topics=[f"{topic}.other"]) == []
    claimed = await claim(NOW + timedelta(seconds=5), lease)
    assert [(c.id, c.user_email, c.user_name, c.attempts, c.claimed_until) for c in claimed] == [
        (messages[0].id, kept.email, kept.name, 0, lease),
        (messages[1].id, None, None, 0, lease),
    ]
    assert (claimed[0].payload, claimed[0].request_id) == ({"n": 0}, "req-0")
    assert await claim(NOW + timedelta(seconds=6), lease) == []  # leased
    async with stores() as tx:
        # A settle with another lease than ours matches nothing.
        assert not await tx.outbox.mark_skipped(
            messages[1].id, claimed_until=lease + timedelta(seconds=1), reason="x", now=NOW
        )
        assert await tx.outbox.mark_skipped(
            messages[1].id, claimed_until=lease, reason="user gone", now=NOW
        )
        assert await tx.outbox.schedule_retry(
            messages[0].id,
            claimed_until=lease,
            attempts=1,
            next_attempt_time=NOW + timedelta(minutes=10),
            error="SMTP 451",
            now=NOW,
        )
        await tx.commit()
    assert await claim(NOW + timedelta(minutes=5), lease) == []  # retry not due yet
    later = NOW + timedelta(minutes=10)
    second_lease = later + timedelta(minutes=1)
    again = await claim(later, second_lease)
    assert [(c.id, c.attempts) for c in again] == [(messages[0].id, 1)]
    async with stores() as tx:
        assert await tx.outbox.release(messages[0].id, claimed_until=second_lease)
        await tx.commit()
    third = await claim(later, second_lease)
    assert [c.id for c in third] == [messages[0].id]
    async with stores() as tx:
        assert await tx.outbox.mark_delivered(messages[0].id, now=later)
        assert not await tx.outbox.mark_delivered(messages[0].id, now=later)
        assert not await tx.outbox.mark_failed(
            messages[0].id, claimed_until=second_lease, attempts=2, error="late", now=later
        )
        await tx.commit()
    assert await claim(later + timedelta(days=1), later + timedelta(days=2)) == []


async def _stored_payload(stores: UnitOfWorkFactory, message_id: uuid.UUID) -> dict[str, Any]:
    """What the outbox table holds now as a row's payload."""
    if isinstance(stores, FakeUnitOfWorkFactory):
        return stores.db.outbox_rows[message_id].message.payload
    assert isinstance(stores, SqlUnitOfWorkFactory)
    async with stores.engine.connect() as conn:
        payload = (
            await conn.execute(select(outbox.c.payload).where(outbox.c.id == message_id))
        ).scalar_one()
    assert isinstance(payload, dict)
    return payload


@pytest.mark.parametrize("settle", ["delivered", "failed", "skipped"])
async def test_a_settled_outbox_row_keeps_no_code(stores: UnitOfWorkFactory, settle: str) -> None:
    """A mailed code lives in its outbox row only until the row is settled."""
    user = new_user()
    await add(stores, user)
    topic = f"contract.{uuid.uuid4().hex[:12]}"
    message = OutboxMessage(
        topic=topic,
        aggregate_id=user.id,
        payload={"email": user.email, "code": "secret-code-value", "n": 1},
        request_id="req",
        create_time=NOW,
    )
    async with stores() as tx:
        await tx.outbox.add(message)
        await tx.commit()
    assert (await _stored_payload(stores, message.id))["code"] == "secret-code-value"
    lease = NOW + timedelta(minutes=1)
    async with stores() as tx:
        [claimed] = await tx.outbox.claim_due(topics=[topic], now=NOW, lease_until=lease, limit=1)
        # A retry keeps the code: the mail has yet to go out.
        assert await tx.outbox.schedule_retry(
            message.id, claimed_until=lease, attempts=1, next_attempt_time=NOW, error="x", now=NOW
        )
        await tx.commit()
    assert (await _stored_payload(stores, message.id))["code"] == "secret-code-value"
    async with stores() as tx:
        [claimed] = await tx.outbox.claim_due(topics=[topic], now=NOW, lease_until=lease, limit=1)
        assert claimed.payload["code"] == "secret-code-value"
        if settle == "delivered":
            assert await tx.outbox.mark_delivered(message.id, now=NOW)
        elif settle == "failed":
            assert await tx.outbox.mark_failed(
                message.id, claimed_until=lease, attempts=2, error="gave up", now=NOW
            )
        else:
            assert await tx.outbox.mark_skipped(
                message.id, claimed_until=lease, reason="gone", now=NOW
            )
        await tx.commit()
    assert await _stored_payload(stores, message.id) == {"email": user.email, "n": 1}


async def test_get_many_returns_the_existing_users_of_a_set_of_ids(
    stores: UnitOfWorkFactory,
) -> None:
    a, b = new_user(), new_user()
    await add(stores, a, b)
    async with stores(write=False) as tx:
        found = await tx.users.get_many({a.id, b.id, uuid.uuid4()})
        assert sorted(found, key=lambda u: u.id) == sorted([a, b], key=lambda u: u.id)
        assert await tx.users.get_many(set()) == []
        many = await tx.users.get_many({a.id, *(uuid.uuid4() for _ in range(999))})
        assert many == [a]


def test_days_of_their_own_never_meet() -> None:
    """Two tests on one day, or a day apart, would list each other's users."""
    days = sorted(_day_of_its_own() for _ in range(1000))
    assert all(b - a >= timedelta(days=2) for a, b in itertools.pairwise(days))
    # Before the days of tests/e2e/test_fleet_reads.py, which writes to the same databases.
    assert days[-1] < datetime(1850, 1, 1, tzinfo=UTC)


ALL = ["ada-admin", "ada-disabled", "bob-service", "both", "a_%lit", "x-ada-admin"]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", ALL),
        ("state = ACTIVE", ["ada-admin", "bob-service", "both", "a_%lit"]),
        ("state = DISABLED", ["ada-disabled", "x-ada-admin"]),
        ("state = ACTIVE AND state = DISABLED", []),
        ('roles:"admin"', ["ada-admin", "both"]),
        ('roles:"service"', ["bob-service", "both", "x-ada-admin"]),
        ("roles:admin AND roles:service", ["both"]),
        # A prefix, not a substring: x-ada-admin contains "ada-" but does not start with it.
        ('email:"ADA-*"', ["ada-admin", "ada-disabled"]),
        # "_" and "%" are literal characters, not LIKE wildcards.
        ('email:"a_%*"', ["a_%lit"]),
        ('email:"a*"', ["ada-admin", "ada-disabled", "a_%lit"]),
        ('email = "BOTH@{domain}"', ["both"]),
        ('email:"ada-admin@{domain}"', ["ada-admin"]),
        ("create_time > {t1}", ["bob-service", "both", "a_%lit", "x-ada-admin"]),
        ("create_time >= {t1}", ["ada-disabled", "bob-service", "both", "a_%lit", "x-ada-admin"]),
        ("create_time < {t1}", ["ada-admin"]),
        ("create_time <= {t1}", ["ada-admin", "ada-disabled"]),
        ('roles:admin AND state = ACTIVE AND email:"ada*"', ["ada-admin"]),
    ],
)
async def test_every_filter_term_selects_alike(
    stores: UnitOfWorkFactory, source: str, expected: list[str]
) -> None:
    day = _day_of_its_own()
    domain = f"{uuid.uuid4().hex[:10]}.example"
    specs = [
        ("ada-admin", ("admin",), UserState.ACTIVE),
        ("ada-disabled", (), UserState.DISABLED),
        ("bob-service", ("service",), UserState.ACTIVE),
        ("both", ("admin", "service"), UserState.ACTIVE),
        ("a_%lit", (), UserState.ACTIVE),
        ("x-ada-admin", ("service",), UserState.DISABLED),
    ]
    made = {
        name: new_user(
            email=f"{name}@{domain}",
            roles=roles,
            state=state,
            create_time=day + timedelta(seconds=n),
        )
        for n, (name, roles, state) in enumerate(specs)
    }
    # And one just before the day, which the bounds below leave out.
    await add(stores, *made.values(), new_user(create_time=day - timedelta(microseconds=1)))
    t1 = (day + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    day_end = (day + timedelta(days=1)).isoformat().replace("+00:00", "Z")
    where = parse_filter(
        " AND ".join(
            part
            for part in (
                source.format(t1=t1, domain=domain),
                f"create_time >= {day.isoformat()}",
                f"create_time < {day_end}",
            )
            if part
        )
    )
    names = {u.id: name for name, u in made.items()}
    async with stores(write=False) as tx:
        listed = await tx.users.list(limit=50, after=None, where=where)
        count = await tx.users.count(where=where)
    got = [names.get(u.id, u.email) for u in listed]
    assert sorted(got) == sorted(expected)
    # Newest first, as always.
    assert got == [n for n in reversed([s[0] for s in specs]) if n in expected]
    assert count == len(expected)


# --- last login, password change time, unlock, dormant accounts ------------------------------


async def test_a_login_success_sets_the_last_login_time_and_clears_failures(
    stores: UnitOfWorkFactory,
) -> None:
    user = new_user()
    await add(stores, user)
    lock_until = NOW + timedelta(minutes=15)
    async with stores() as tx:
        for _ in range(3):
            await tx.users.record_login_failure(
                user.id, now=NOW, max_failures=3, lock_until=lock_until
            )
        await tx.commit()
    locked = await stored(stores, user.id)
    assert locked is not None and (locked.failed_login_count, locked.locked_until) == (
        3,
        lock_until,
    )
    at = NOW + timedelta(hours=1, microseconds=7)
    async with stores() as tx:
        await tx.users.record_login_success(user.id, now=at)
        await tx.commit()
    after = await stored(stores, user.id)
    assert after == dataclasses.replace(
        user, last_login_time=at, failed_login_count=0, locked_until=None
    )


async def test_unlock_and_password_columns_are_writable(stores: UnitOfWorkFactory) -> None:
    user = new_user(failed_login_count=4, locked_until=NOW + timedelta(minutes=5))
    await add(stores, user)
    changed = NOW + timedelta(days=1)
    async with stores() as tx:
        updated = await tx.users.update(
            user.id,
            {"failed_login_count": 0, "locked_until": None, "password_change_time": changed},
            expected_version=1,
        )
        await tx.commit()
    assert updated == dataclasses.replace(
        user, failed_login_count=0, locked_until=None, password_change_time=changed, version=2
    )
    assert await stored(stores, user.id) == updated


async def test_point_reads_decode_the_login_times(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    user = new_user(
        last_login_time=NOW + timedelta(seconds=1, microseconds=5),
        password_change_time=NOW - timedelta(days=3, microseconds=9),
    )
    never = new_user()
    await add(stores, user, never)
    assert await point_reads.get(user.id) == await stored(stores, user.id) == user
    assert await point_reads.get(never.id) == never


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # Unset counts as older than any time: it matches < and <=, never > or >=.
        ("last_login_time < {t1}", ["never", "early"]),
        ("last_login_time <= {t1}", ["never", "early", "at-t1"]),
        ("last_login_time > {t1}", ["late"]),
        ("last_login_time >= {t1}", ["at-t1", "late"]),
        ("last_login_time >= {t0} AND last_login_time < {t2}", ["early", "at-t1"]),
        ("password_change_time < {t1}", ["never", "at-t1"]),
        ("password_change_time >= {t1}", ["early", "late"]),
        ("last_login_time < {t1} AND password_change_time >= {t1}", ["early"]),
    ],
)
async def test_optional_time_filters_select_alike(
    stores: UnitOfWorkFactory, source: str, expected: list[str]
) -> None:
    day = _day_of_its_own()
    t0, t1, t2 = (day + timedelta(hours=h) for h in (1, 2, 3))
    # name: (last_login_time, password_change_time)
    specs: dict[str, tuple[datetime | None, datetime | None]] = {
        "never": (None, None),
        "early": (t0, t2),
        "at-t1": (t1, t0),
        "late": (t2, t1),
    }
    made = {
        name: new_user(
            create_time=day + timedelta(seconds=n),
            last_login_time=login,
            password_change_time=changed,
        )
        for n, (name, (login, changed)) in enumerate(specs.items())
    }
    await add(stores, *made.values())

    def z(t: datetime) -> str:
        return t.isoformat().replace("+00:00", "Z")

    day_end = z(day + timedelta(days=1))
    where = parse_filter(
        f"{source.format(t0=z(t0), t1=z(t1), t2=z(t2))} AND create_time >= {z(day)}"
        f" AND create_time < {day_end}"
    )
    names = {u.id: name for name, u in made.items()}
    async with stores(write=False) as tx:
        listed = await tx.users.list(limit=50, after=None, where=where)
        count = await tx.users.count(where=where)
    assert sorted(names.get(u.id, u.email) for u in listed) == sorted(expected)
    assert count == len(expected)


async def test_dormant_users_are_the_active_password_users_not_seen_since_the_cutoff(
    stores: UnitOfWorkFactory,
) -> None:
    day = _day_of_its_own()
    cutoff = day + timedelta(hours=12)
    before, after = cutoff - timedelta(microseconds=1), cutoff
    specs = {
        "old-login": new_user(create_time=before, last_login_time=before),
        "never-old": new_user(create_time=before),
        "recent-login": new_user(create_time=before, last_login_time=after),
        "never-new": new_user(create_time=after),
        "disabled": new_user(create_time=before, state=UserState.DISABLED),
        "service": new_user(create_time=before, password_hash=SERVICE_ACCOUNT_PASSWORD_HASH),
    }
    await add(stores, *specs.values())
    names = {u.id: name for name, u in specs.items()}
    async with stores(write=False) as tx:
        found = await tx.users.dormant(cutoff=cutoff, limit=100_000)
    assert sorted(names[u.id] for u in found if u.id in names) == ["never-old", "old-login"]
    assert all(u.state is UserState.ACTIVE for u in found)
    async with stores(write=False) as tx:
        assert len(await tx.users.dormant(cutoff=cutoff, limit=1)) == 1


# --- soft delete ---------------------------------------------------------------------------


async def test_a_soft_deleted_user_reads_back_and_keeps_its_email_until_removed(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    user = new_user(
        state=UserState.DELETED,
        delete_time=NOW + timedelta(seconds=1, microseconds=5),
        purge_time=NOW + timedelta(days=30, seconds=1),
        deleted_from_state=UserState.DISABLED,
    )
    await add(stores, user)
    assert await stored(stores, user.id) == user
    assert await point_reads.get(user.id) == user
    assert await point_reads.auth_state(user.id) == (1, UserState.DELETED)
    with pytest.raises(EmailTaken):
        await add(stores, new_user(email=user.email))
    async with stores() as tx:
        assert await tx.users.delete(user.id)
        await tx.commit()
    again = new_user(email=user.email)
    await add(stores, again)
    assert await stored(stores, again.id) == again


async def test_soft_delete_fields_are_written_and_cleared_by_update(
    stores: UnitOfWorkFactory,
) -> None:
    user = new_user()
    await add(stores, user)
    values = {
        "state": UserState.DELETED.value,
        "deleted_from_state": UserState.ACTIVE.value,
        "delete_time": NOW + timedelta(hours=1),
        "purge_time": NOW + timedelta(days=30),
    }
    async with stores() as tx:
        deleted = await tx.users.update(user.id, values, revoke_tokens=True)
        await tx.commit()
    assert deleted is not None and deleted == await stored(stores, user.id)
    assert (deleted.state, deleted.deleted_from_state, deleted.token_version) == (
        UserState.DELETED,
        UserState.ACTIVE,
        2,
    )
    assert (deleted.delete_time, deleted.purge_time) == (
        values["delete_time"],
        values["purge_time"],
    )
    cleared = {
        "state": "active",
        "deleted_from_state": None,
        "delete_time": None,
        "purge_time": None,
    }
    async with stores() as tx:
        restored = await tx.users.update(user.id, cleared)
        await tx.commit()
    assert restored is not None
    assert (restored.state, restored.deleted_from_state, restored.delete_time) == (
        UserState.ACTIVE,
        None,
        None,
    )
    assert restored.purge_time is None


async def test_deleted_users_are_listed_and_counted_only_with_show_deleted(
    stores: UnitOfWorkFactory,
) -> None:
    day = _day_of_its_own()
    active = new_user(create_time=day)
    deleted = new_user(
        create_time=day + timedelta(seconds=1),
        state=UserState.DELETED,
        delete_time=day,
        purge_time=day + timedelta(days=30),
        deleted_from_state=UserState.ACTIVE,
    )
    await add(stores, active, deleted)
    end = (day + timedelta(days=1)).isoformat()
    bounds = parse_filter(f'create_time >= "{day.isoformat()}" AND create_time < "{end}"')
    cases = {
        False: [active.id],
        True: [deleted.id, active.id],
    }
    async with stores(write=False) as tx:
        for show, expected in cases.items():
            where = dataclasses.replace(bounds, show_deleted=show)
            listed = await tx.users.list(limit=10, after=None, where=where)
            assert [u.id for u in listed] == expected
        only = dataclasses.replace(bounds, states=frozenset({UserState.DELETED}), show_deleted=True)
        listed = await tx.users.list(limit=10, after=None, where=only)
        assert [u.id for u in listed] == [deleted.id]
        assert await tx.users.count(where=only) == 1
        by_email = await tx.users.list(limit=10, after=None, where=UserFilter(email=deleted.email))
        assert by_email == []
        assert await tx.users.count(where=UserFilter(email=deleted.email)) == 0
        assert await tx.users.count(where=UserFilter(email=deleted.email, show_deleted=True)) == 1


async def test_list_purgeable_returns_deleted_users_due_oldest_first(
    stores: UnitOfWorkFactory,
) -> None:
    day = _day_of_its_own()

    def deleted(purge_time: datetime) -> User:
        return new_user(
            state=UserState.DELETED,
            delete_time=purge_time - timedelta(days=30),
            purge_time=purge_time,
            deleted_from_state=UserState.ACTIVE,
        )

    late, early, not_yet = (
        deleted(day + timedelta(hours=2)),
        deleted(day + timedelta(hours=1)),
        deleted(day + timedelta(hours=3)),
    )
    # Not deleted: never purgeable, whatever a stray purge_time says.
    active = new_user()
    await add(stores, late, early, not_yet, active)
    mine = {late.id, early.id, not_yet.id, active.id}
    async with stores(write=False) as tx:
        due = await tx.users.list_purgeable(now=day + timedelta(hours=2), limit=100_000)
        one = await tx.users.list_purgeable(now=day + timedelta(hours=2), limit=1)
    assert [u for u in due if u in mine] == [early.id, late.id]
    assert len(one) == 1


async def test_tombstone_replaces_personal_values_of_one_users_events_only(
    stores: UnitOfWorkFactory,
) -> None:
    gone, other = uuid.uuid4(), uuid.uuid4()

    def event(user_id: uuid.UUID, changes: dict[str, Any], n: int) -> AuditEvent:
        return AuditEvent(
            user_id=user_id,
            action="user.updated",
            changes=changes,
            actor="system",
            request_id=f"req-{n}",
            create_time=NOW + timedelta(seconds=n),
        )

    events = [
        event(
            gone,
            {"email": {"old": None, "new": "a@x.example"}, "roles": {"old": None, "new": []}},
            0,
        ),
        event(gone, {"name": {"old": "Ann", "new": "Anna"}}, 1),
        event(gone, {"state": {"old": "active", "new": "deleted"}}, 2),
        event(other, {"name": {"old": "Bob", "new": "Bobby"}}, 3),
    ]
    async with stores() as tx:
        for e in events:
            await tx.audit.add(e)
        assert await tx.audit.tombstone_user(gone) == 2
        await tx.commit()
    async with stores(write=False) as tx:
        trail = await tx.audit.list(limit=10, after=None, user_id=gone)
        untouched = await tx.audit.list(limit=10, after=None, user_id=other)
    assert [e.changes for e in reversed(trail)] == [
        {"email": {"old": None, "new": "[PURGED]"}, "roles": {"old": None, "new": []}},
        {"name": {"old": "[PURGED]", "new": "[PURGED]"}},
        {"state": {"old": "active", "new": "deleted"}},
    ]
    assert [(e.id, e.action, e.actor, e.request_id, e.create_time) for e in reversed(trail)] == [
        (e.id, e.action, e.actor, e.request_id, e.create_time) for e in events[:3]
    ]
    assert untouched == [events[3]]


# --- labels and admin metadata -----------------------------------------------------------------


async def test_labels_and_admin_metadata_read_back_follow_updates_and_go_with_the_user(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    """Both JSON columns read back alike on every path (store, point read, list); the
    searchable copy of the labels follows each write and goes when the user goes."""
    metadata = {
        "note": "vip",
        "tier": 2,
        "ratio": 0.5,
        "tags": ["a", None, True],
        "deep": {"k": {}},
    }
    user = new_user(labels={"team": "billing", "env": ""}, admin_metadata=metadata)
    plain = new_user()
    await add(stores, user, plain)
    assert await stored(stores, user.id) == user
    assert await point_reads.get(user.id) == user
    assert (await point_reads.get(plain.id)) == plain == await stored(stores, plain.id)
    assert plain.labels == {} and plain.admin_metadata == {}

    billing = parse_filter(f'labels.team = "billing" AND email = "{user.email}"')
    async with stores() as tx:
        assert [u.id for u in await tx.users.list(limit=5, after=None, where=billing)] == [user.id]
        updated = await tx.users.update(
            user.id, {"labels": {"team": "ops"}, "admin_metadata": {}}, expected_version=1
        )
        await tx.commit()
    assert updated is not None and updated.labels == {"team": "ops"} and updated.version == 2
    assert updated.admin_metadata == {}
    assert await point_reads.get(user.id) == updated == await stored(stores, user.id)
    ops = parse_filter(f'labels.team = "ops" AND email = "{user.email}"')
    async with stores(write=False) as tx:
        assert await tx.users.count(where=billing) == 0
        assert await tx.users.count(where=ops) == 1
    # A stale version changes nothing, the searchable copy included.
    async with stores() as tx:
        assert await tx.users.update(user.id, {"labels": {}}, expected_version=1) is None
        await tx.commit()
    async with stores() as tx:
        assert await tx.users.count(where=ops) == 1
        assert await tx.users.delete(user.id)
        await tx.commit()
    # A new user with the same id and e-mail finds no label left behind.
    await add(stores, dataclasses.replace(user, labels={}, admin_metadata={}))
    async with stores(write=False) as tx:
        assert await tx.users.count(where=ops) == 0


LABELLED = {
    "billing": {"team": "billing"},
    "billing-prod": {"team": "billing", "env": "prod"},
    "ops-prod": {"team": "ops", "env": "prod"},
    "none": {},
}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('labels.team = "billing"', ["billing", "billing-prod"]),
        ("labels.team = billing AND labels.env = prod", ["billing-prod"]),
        ('labels.team != "billing"', ["ops-prod", "none"]),
        ('labels.env != "prod" AND state = ACTIVE', ["billing", "none"]),
        ('labels.team = "billing" AND labels.team = "ops"', []),
        ('labels.team = ""', []),
    ],
)
async def test_label_filters_select_alike(
    stores: UnitOfWorkFactory, source: str, expected: list[str]
) -> None:
    day = _day_of_its_own()
    made = {
        name: new_user(labels=labels, create_time=day + timedelta(seconds=n))
        for n, (name, labels) in enumerate(LABELLED.items())
    }
    # Half through the multi-row path (COPY on PostgreSQL), half one by one.
    items = list(made.values())
    async with stores() as tx:
        await tx.users.add_many(items[:2])
        await tx.commit()
    await add(stores, *items[2:])
    day_end = (day + timedelta(days=1)).isoformat()
    where = parse_filter(
        f"{source} AND create_time >= {day.isoformat()} AND create_time < {day_end}"
    )
    names = {u.id: name for name, u in made.items()}
    async with stores(write=False) as tx:
        listed = await tx.users.list(limit=50, after=None, where=where)
        count = await tx.users.count(where=where)
    assert sorted(names.get(u.id, u.email) for u in listed) == sorted(expected)
    assert count == len(expected)
    assert all(u.labels == made[names[u.id]].labels for u in listed)
