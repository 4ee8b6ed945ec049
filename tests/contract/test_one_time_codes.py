"""Mailed one-time codes and the users columns they set, alike on the fake and both databases."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from tests.contract.test_stores import NOW, add, new_user, stored
from usersvc.domain.one_time_codes import CodePurpose, OneTimeCode, hash_code, new_code
from usersvc.services.ports import UnitOfWorkFactory, UserPointReads

VERIFY = CodePurpose.VERIFY_EMAIL
RECOVER = CodePurpose.RECOVER_PASSWORD
MAX = 3


def a_code(user_id: uuid.UUID, **overrides: Any) -> tuple[str, OneTimeCode]:
    code = new_code()
    values: dict[str, Any] = {
        "user_id": user_id,
        "purpose": VERIFY,
        "code_hash": hash_code(code),
        "email": "someone@example.com",
        "create_time": NOW,
        "expire_time": NOW + timedelta(hours=1),
    }
    values.update(overrides)
    return code, OneTimeCode(**values)


async def put(stores: UnitOfWorkFactory, *codes: OneTimeCode) -> None:
    async with stores() as tx:
        for code in codes:
            await tx.one_time_codes.add(code)
        await tx.commit()


async def redeem(
    stores: UnitOfWorkFactory,
    user_id: uuid.UUID,
    code: str,
    *,
    purpose: CodePurpose = VERIFY,
    at: timedelta = timedelta(0),
) -> OneTimeCode | None:
    async with stores() as tx:
        found = await tx.one_time_codes.redeem(
            user_id, purpose, hash_code(code), now=NOW + at, max_attempts=MAX
        )
        await tx.commit()
    return found


async def test_email_verified_and_password_change_required_read_back_and_are_writable(
    stores: UnitOfWorkFactory, point_reads: UserPointReads
) -> None:
    verified, plain = new_user(email_verified=True, password_change_required=True), new_user()
    await add(stores, verified, plain)
    assert (await stored(stores, verified.id)) == verified
    assert (await point_reads.get(verified.id)) == verified
    assert (await point_reads.get(plain.id)) == plain
    async with stores() as tx:
        updated = await tx.users.update(
            plain.id, {"email_verified": True, "password_change_required": True}
        )
        await tx.commit()
    assert updated is not None and updated.email_verified and updated.password_change_required
    again = await point_reads.get(plain.id)
    assert again is not None and again.email_verified and again.password_change_required


async def test_a_code_is_redeemed_once_and_only_by_its_user_purpose_and_time(
    stores: UnitOfWorkFactory,
) -> None:
    user, other = new_user(), new_user()
    await add(stores, user, other)
    code, record = a_code(user.id)
    await put(stores, record)

    assert await redeem(stores, other.id, code) is None
    assert await redeem(stores, user.id, code, purpose=RECOVER) is None
    assert await redeem(stores, user.id, code, at=timedelta(hours=1)) is None  # expired
    assert await redeem(stores, user.id, new_code()) is None
    found = await redeem(stores, user.id, code)
    assert found == record  # as it was before: unused
    assert await redeem(stores, user.id, code) is None


async def test_a_new_code_supersedes_the_unused_ones_of_its_purpose_only(
    stores: UnitOfWorkFactory,
) -> None:
    user = new_user()
    await add(stores, user)
    old, old_record = a_code(user.id)
    recovery, recovery_record = a_code(user.id, purpose=RECOVER)
    await put(stores, old_record, recovery_record)
    async with stores() as tx:
        assert await tx.one_time_codes.supersede(user.id, VERIFY, now=NOW) == 1
        await tx.commit()
    assert await redeem(stores, user.id, old) is None
    assert await redeem(stores, user.id, recovery, purpose=RECOVER) is not None


async def test_wrong_attempts_burn_the_outstanding_code(stores: UnitOfWorkFactory) -> None:
    user, bystander = new_user(), new_user()
    await add(stores, user, bystander)
    code, record = a_code(user.id)
    spared, spared_record = a_code(bystander.id)
    await put(stores, record, spared_record)
    for _ in range(MAX - 1):
        async with stores() as tx:
            await tx.one_time_codes.record_failure(user.id, VERIFY, now=NOW, max_attempts=MAX)
            await tx.commit()
    found = await redeem(stores, user.id, code)
    assert found is not None and found.failed_attempts == MAX - 1

    code, record = a_code(user.id)
    await put(stores, record)
    for _ in range(MAX):
        async with stores() as tx:
            await tx.one_time_codes.record_failure(user.id, VERIFY, now=NOW, max_attempts=MAX)
            await tx.commit()
    assert await redeem(stores, user.id, code) is None
    assert await redeem(stores, bystander.id, spared) is not None


async def test_codes_go_with_their_user(stores: UnitOfWorkFactory) -> None:
    user = new_user()
    await add(stores, user)
    code, record = a_code(user.id)
    await put(stores, record)
    async with stores() as tx:
        assert await tx.users.delete(user.id)
        await tx.commit()
    await add(stores, user)  # the same id again: the old code did not survive
    assert await redeem(stores, user.id, code) is None


async def test_two_concurrent_redeems_of_one_code_succeed_once(
    store_url: str, stores: UnitOfWorkFactory
) -> None:
    if store_url == "fake":
        pytest.skip("the fake runs one transaction at a time; the race is the databases'")
    user = new_user()
    await add(stores, user)
    code, record = a_code(user.id)
    await put(stores, record)
    async with stores() as first:
        got_first = await first.one_time_codes.redeem(
            user.id, VERIFY, hash_code(code), now=NOW, max_attempts=MAX
        )
        # The second redeem runs while the first transaction is open: it must wait for it.
        second = asyncio.create_task(redeem(stores, user.id, code))
        await asyncio.sleep(0.2)
        assert not second.done()
        await first.commit()
    assert got_first is not None
    assert await asyncio.wait_for(second, 10) is None
