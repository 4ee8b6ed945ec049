"""WatchUserEvents on PostgreSQL under load: concurrent writers committing out of order,
watchers that disconnect and resume, a server restart, and wake-ups across processes.

"Commit order" is the feed's order: per user it is the order the changes committed in (the
row lock orders them), and every watcher sees the same total order (the events' seq).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from sqlalchemy import text

from tests.e2e.auth_helpers import PASSWORD, unique_email
from tests.e2e.watch_helpers import Watch
from tests.processes import ServerProcess, server_env
from tests.smtp_server import free_port
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    ensure_admin,
    login,
    make_settings,
    sync_engine,
    throwaway_database,
)
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.db import create_engine
from usersvc.adapters.unit_of_work import SqlUnitOfWorkFactory
from usersvc.domain import user_events
from usersvc.domain.models import UserState, UserView
from usersvc.domain.user_events import UserChange

ADMIN_EMAIL = "admin@example.com"
WRITERS = 8
WATCHERS = 3


@pytest.fixture(scope="module")
def feed_database(postgres_admin_url: str) -> Iterator[str]:
    with throwaway_database(postgres_admin_url) as url:
        yield url


def _change(request_id: str) -> UserChange:
    now = datetime.now(UTC)
    user = UserView(
        id=uuid.uuid4(),
        email=f"{request_id}@example.com",
        name=request_id,
        roles=(),
        state=UserState.ACTIVE,
        create_time=now,
        update_time=now,
        version=1,
    )
    return UserChange(user_events.UPDATED, user, ("name",), request_id, now)


def _write_concurrently(url: str, prefix: str, per_writer: int) -> None:
    """WRITERS transactions at a time, each holding its event a random while before it
    commits (so commits overtake each other), one in twenty rolled back instead."""

    async def writer(uow: SqlUnitOfWorkFactory, number: int) -> None:
        for i in range(per_writer):
            async with uow() as tx:
                await tx.user_events.add(_change(f"{prefix}-{number}-{i}"))
                await asyncio.sleep(random.uniform(0, 0.02))
                if random.random() < 0.05:
                    continue  # rolled back: a number of the sequence nobody commits
                await tx.commit()

    async def main() -> None:
        engine = create_engine(url, pool_size=WRITERS)
        try:
            uow = SqlUnitOfWorkFactory(engine)
            await asyncio.gather(*(writer(uow, n) for n in range(WRITERS)))
        finally:
            await engine.dispose()

    asyncio.run(main())


class ResumingWatcher(threading.Thread):
    """Reads the feed from `token`, hangs up after a random number of messages and resumes
    from the last token it got, also after any error (a restart), until it has `wanted`
    events of `prefix` or time runs out."""

    def __init__(self, address: str, token: str, after: str, prefix: str) -> None:
        super().__init__(daemon=True)
        self.address, self.token, self.after, self.prefix = address, token, after, prefix
        self.seen: list[str] = []
        self.wanted: int | None = None
        self.resumes = 0
        self.errors: Counter[str] = Counter()
        self.deadline = time.monotonic() + 120

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = UserServiceStub(channel)
            while time.monotonic() < self.deadline and not self._done():
                budget = random.randint(1, 150)
                call = stub.WatchUserEvents(
                    pb.WatchUserEventsRequest(after=self.after),
                    metadata=(("authorization", f"Bearer {self.token}"),),
                )
                try:
                    for response in call:
                        self.after = response.resume_token
                        if response.event.request_id.startswith(self.prefix):
                            self.seen.append(response.event.request_id)
                        budget -= 1
                        if budget == 0 or self._done():
                            break
                except grpc.RpcError as err:
                    self.errors[err.code().name] += 1
                    time.sleep(0.05)
                finally:
                    call.cancel()
                self.resumes += 1

    def _done(self) -> bool:
        return self.wanted is not None and len(self.seen) >= self.wanted


def _committed(url: str, prefix: str) -> list[tuple[int, str]]:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT seq, request_id FROM user_events WHERE request_id LIKE :p ORDER BY seq"
                ),
                {"p": f"{prefix}-%"},
            ).all()
    finally:
        engine.dispose()
    return [(int(r[0]), str(r[1])) for r in rows]


def _problems(expected: list[tuple[int, str]], seen: list[str]) -> str:
    seq_of = dict((rid, seq) for seq, rid in expected)
    order = [rid for _, rid in expected]
    counts = Counter(seen)
    missing = sorted(seq_of[r] for r in order if counts[r] == 0)
    duplicated = sorted(seq_of.get(r, -1) for r, n in counts.items() if n > 1)
    unknown = sorted(r for r in counts if r not in seq_of)
    out_of_order = next(
        (i for i, (a, b) in enumerate(zip(seen, order, strict=False)) if a != b), None
    )
    return (
        f"{len(seen)} seen of {len(order)}; missing seqs {missing[:20]} ({len(missing)}), "
        f"duplicated seqs {duplicated[:20]} ({len(duplicated)}), not committed {unknown[:5]}, "
        f"first difference at index {out_of_order}"
        + (
            f" (seq {seq_of.get(seen[out_of_order], -1)} where {seq_of[order[out_of_order]]} "
            "was due)"
            if out_of_order is not None and out_of_order < len(order)
            else ""
        )
    )


def _run_load(feed_database: str, per_writer: int) -> None:
    prefix = f"load{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        settings = make_settings(
            feed_database, data_dir, listen_address=f"127.0.0.1:{port}", db_pool_size=12
        )
        ensure_admin(settings, ADMIN_EMAIL)
        server = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
                start = Watch(UserServiceStub(channel), token).started()
                after = start.last_token
                start.cancel()
            watchers = [
                ResumingWatcher(server.address, token, after, prefix) for _ in range(WATCHERS)
            ]
            for w in watchers:
                w.start()
            writing = threading.Thread(
                target=_write_concurrently, args=(feed_database, prefix, per_writer)
            )
            writing.start()
            # A restart while the writers write and the watchers read.
            time.sleep(1.0)
            server.stop(grace=5)
            server = ServerThread(settings).start()
            writing.join(timeout=120)
            assert not writing.is_alive(), "writers did not finish"
            expected = _committed(feed_database, prefix)
            assert len(expected) > WRITERS * per_writer * 0.8
            for w in watchers:
                w.wanted = len(expected)
            for w in watchers:
                w.join(timeout=max(1.0, w.deadline - time.monotonic()))
            order = [rid for _, rid in expected]
            for number, w in enumerate(watchers):
                assert w.seen == order, (
                    f"watcher {number} ({w.resumes} resumes, errors {dict(w.errors)}): "
                    + _problems(expected, w.seen)
                )
            assert sum(w.resumes for w in watchers) >= WATCHERS * 2
        finally:
            server.stop()


def test_every_watcher_sees_every_change_once_in_order_across_resumes_and_a_restart(
    feed_database: str,
) -> None:
    """Scaled down for the default suite (8 writers x 40 changes); the full size (x 200)
    runs with `-m slow`."""
    _run_load(feed_database, per_writer=40)


@pytest.mark.slow
def test_full_size_load(feed_database: str) -> None:
    _run_load(feed_database, per_writer=200)


def test_a_change_through_one_process_wakes_a_watcher_on_another(feed_database: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        ensure_admin(make_settings(feed_database, data_dir), ADMIN_EMAIL)
        # Polling every 30 s: only the NOTIFY can bring the event within the bound below.
        env = server_env(feed_database, data_dir, USERSVC_WATCH_POLL_SECONDS="30")
        first, second = ServerProcess(env), ServerProcess(env)
        try:
            with (
                grpc.insecure_channel(first.address) as one,
                grpc.insecure_channel(second.address) as two,
            ):
                token = login(one, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
                watch = Watch(UserServiceStub(one), token).started()
                time.sleep(0.5)  # the listener of the first process is up by now
                email = unique_email("notify")
                started = time.monotonic()
                UserServiceStub(two).CreateUser(
                    pb.CreateUserRequest(email=email, name="Notified", password=PASSWORD),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                watch.wait_until(lambda w: any(e.user.email == email for e in w.events), 5)
                elapsed = time.monotonic() - started
                watch.cancel()
            assert elapsed < 2.0, f"the event took {elapsed:.2f} s"
        finally:
            first.terminate()
            second.terminate()


def test_the_listener_comes_back_after_its_connection_dies(feed_database: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        # Polling every 30 s: within the bounds below only a wake-up can bring an event.
        settings = make_settings(feed_database, data_dir, watch_poll_seconds=30)
        ensure_admin(settings, ADMIN_EMAIL)
        server = ServerThread(settings).start()
        engine = sync_engine(feed_database)
        try:
            with grpc.insecure_channel(server.address) as channel:
                token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
                watch = Watch(UserServiceStub(channel), token).started()
                time.sleep(0.5)
                # What a database restart does to the listening connection.
                with engine.begin() as conn:
                    killed = conn.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                        )
                    ).scalar_one()
                assert killed == 1
                time.sleep(2.0)  # reconnected (it retries every second)
                email = unique_email("relisten")
                started = time.monotonic()
                # Written by another process's connection: only the NOTIFY wakes the watcher.
                _write_one(feed_database, email)
                watch.wait_until(lambda w: any(e.request_id == email for e in w.events), 10)
                assert time.monotonic() - started < 5
                watch.cancel()
        finally:
            engine.dispose()
            server.stop()


def _write_one(url: str, request_id: str) -> None:
    async def main() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            async with SqlUnitOfWorkFactory(engine)() as tx:
                await tx.user_events.add(_change(request_id))
                await tx.commit()
        finally:
            await engine.dispose()

    asyncio.run(main())
