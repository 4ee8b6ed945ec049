"""Account lifecycle through real stubs: the login failure counter under concurrency, the lock
and UnlockUser, login counters shown to admins only, last login and password change times
(and filtering on them), and the dormant-account job, on both databases."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import update
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import (
    OTHER_PASSWORD,
    PASSWORD,
    anonymous_refusal,
    bearer,
    code_of,
    create_user,
    failure_of,
    login_pair,
    service_token_for,
    unique_email,
    user_row,
)
from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    ensure_admin,
    login,
    make_settings,
    sync_engine,
    throwaway_database,
    throwaway_sqlite,
    with_bearer,
)
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import users as users_table
from usersvc.config import Settings
from usersvc.services.users import UserService

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
MAX_FAILURES = 10  # the session server's login_max_failures (the default)
CONCURRENT_FAILURES = 30


def _time(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _fail_logins(channel: grpc.Channel, email: str, times: int) -> None:
    for _ in range(times):
        assert code_of(lambda: login_pair(channel, email, "wrong password!!")) == UNAUTH


def _events(users: UserServiceStub, user_id: str) -> list[user_pb2.AuditEvent]:
    response = users.ListAuditEvents(pb.ListAuditEventsRequest(user_id=user_id, page_size=100))
    return list(response.events)


# --- the failure counter is atomic ------------------------------------------------------------


@pytest.fixture(scope="module")
def lenient_server(database_url: str) -> Iterator[ServerThread]:
    """A replica on the session database whose lock needs more failures than the test sends,
    so that every one of them must be counted."""
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir, login_max_failures=100)
        thread = ServerThread(settings).start()
        yield thread
        thread.stop()


def test_thirty_concurrent_wrong_passwords_are_counted_exactly(
    lenient_server: ServerThread, users: UserServiceStub, db: Engine
) -> None:
    """One UPDATE ... SET failed_login_count = failed_login_count + 1 per failure: no
    read-modify-write, so none is lost however the attempts interleave."""
    user = create_user(users)
    with grpc.insecure_channel(lenient_server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = AuthServiceStub(channel)
        request = auth_pb.LoginRequest(email=user.email, password="wrong password!!")

        def attempt(_: int) -> grpc.StatusCode:
            return code_of(lambda: stub.Login(request, timeout=60))

        with ThreadPoolExecutor(CONCURRENT_FAILURES) as pool:
            codes = list(pool.map(attempt, range(CONCURRENT_FAILURES)))
    assert codes == [UNAUTH] * CONCURRENT_FAILURES
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (CONCURRENT_FAILURES, None)
    seen = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert seen.failed_login_count == CONCURRENT_FAILURES
    assert not seen.HasField("locked_until")


# --- the lock, the counters, and UnlockUser ---------------------------------------------------


def test_unlock_lets_the_correct_password_in_at_once_and_is_audited(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    user = create_user(users)
    own_token = login_pair(channel, user.email).access_token  # from before the lock
    _fail_logins(channel, user.email, MAX_FAILURES)
    assert code_of(lambda: login_pair(channel, user.email)) == UNAUTH

    locked = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert locked.failed_login_count == MAX_FAILURES
    assert _time(locked.locked_until) > datetime.now(UTC)
    # The user itself does not see its counters (nor would a service).
    itself = UserServiceStub(channel).GetUser(
        pb.GetUserRequest(id=user.id), metadata=bearer(own_token)
    )
    assert itself.user.failed_login_count == 0
    assert not itself.user.HasField("locked_until")
    assert itself.user.HasField("last_login_time")

    stale = failure_of(lambda: users.UnlockUser(pb.UnlockUserRequest(id=user.id, etag='"999"')))
    assert (stale.code, stale.reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    unlocked = users.UnlockUser(pb.UnlockUserRequest(id=user.id, etag=locked.etag)).user
    assert unlocked.failed_login_count == 0
    assert not unlocked.HasField("locked_until")
    assert unlocked.etag != locked.etag
    stored = user_row(db, user.id)
    assert (stored["failed_login_count"], stored["locked_until"]) == (0, None)
    # The tokens stayed valid; the correct password works at once.
    assert (
        code_of(
            lambda: UserServiceStub(channel).GetUser(
                pb.GetUserRequest(id=user.id), metadata=bearer(own_token)
            )
        )
        == grpc.StatusCode.OK
    )
    assert login_pair(channel, user.email).access_token

    event = next(e for e in _events(users, user.id) if e.action == "user.unlocked")
    changes = {c.field: (c.old_value, c.new_value) for c in event.changes}
    assert changes["failed_login_count"][0].number_value == MAX_FAILURES
    assert changes["failed_login_count"][1].number_value == 0
    assert changes["locked_until"][0].string_value
    assert changes["locked_until"][1].WhichOneof("kind") == "null_value"
    assert event.actor != "anonymous"

    # Nothing left to unlock: the same user, the same etag, no new event.
    after_login = users.GetUser(pb.GetUserRequest(id=user.id)).user
    count = len(_events(users, user.id))
    assert users.UnlockUser(pb.UnlockUserRequest(id=user.id)).user == after_login
    assert len(_events(users, user.id)) == count


def test_unlock_of_an_unknown_or_malformed_id(users: UserServiceStub) -> None:
    missing = failure_of(lambda: users.UnlockUser(pb.UnlockUserRequest(id=str(uuid.uuid4()))))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    bad = failure_of(lambda: users.UnlockUser(pb.UnlockUserRequest(id="not-a-uuid")))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(bad.violations) == ["id"]


def test_a_locked_account_accepts_no_current_password(
    channel: grpc.Channel, users: UserServiceStub
) -> None:
    """ChangePassword's current_password is the other place a password is checked: while
    the account is locked even the correct one is refused, and nothing changes."""
    user = create_user(users)
    own_token = login_pair(channel, user.email).access_token
    _fail_logins(channel, user.email, MAX_FAILURES)
    before = users.GetUser(pb.GetUserRequest(id=user.id)).user
    refused = failure_of(
        lambda: UserServiceStub(channel).ChangePassword(
            pb.ChangePasswordRequest(
                id=user.id, current_password=PASSWORD, new_password=OTHER_PASSWORD
            ),
            metadata=bearer(own_token),
        )
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(refused.violations) == ["current_password"]
    assert users.GetUser(pb.GetUserRequest(id=user.id)).user == before
    users.UnlockUser(pb.UnlockUserRequest(id=user.id))
    assert login_pair(channel, user.email).access_token  # the old password, unchanged


# --- last login and password change times -----------------------------------------------------


def test_login_sets_the_last_login_time_refresh_does_not(
    auth: AuthServiceStub, channel: grpc.Channel, users: UserServiceStub
) -> None:
    user = create_user(users)
    assert not user.HasField("last_login_time")
    assert _time(user.password_change_time) == _time(user.create_time)

    started = datetime.now(UTC) - timedelta(seconds=1)
    pair = login_pair(channel, user.email)
    logged_in = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert started <= _time(logged_in.last_login_time) <= datetime.now(UTC)
    # Not a change of the resource.
    assert (logged_in.etag, logged_in.update_time) == (user.etag, user.update_time)

    auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=pair.refresh_token))
    _fail_logins(channel, user.email, 1)
    again = users.GetUser(pb.GetUserRequest(id=user.id)).user
    assert again.last_login_time == logged_in.last_login_time

    changed = users.ChangePassword(
        pb.ChangePasswordRequest(id=user.id, new_password=OTHER_PASSWORD)
    ).user
    assert _time(changed.password_change_time) > _time(user.password_change_time)
    assert changed.password_change_time == changed.update_time


def test_list_filters_on_login_and_password_times(
    channel: grpc.Channel, users: UserServiceStub, db: Engine
) -> None:
    prefix = f"times-{uuid.uuid4().hex[:8]}"
    before_creation = datetime.now(UTC)
    create_user(users, email=f"{prefix}-never@example.com")
    active = create_user(users, email=f"{prefix}-active@example.com")
    old = create_user(users, email=f"{prefix}-old@example.com")
    before_login = datetime.now(UTC)
    login_pair(channel, active.email)
    login_pair(channel, old.email)
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with db.begin() as conn:
        conn.execute(
            update(users_table)
            .where(users_table.c.id == uuid.UUID(old.id))
            .values(last_login_time=long_ago, password_change_time=long_ago)
        )

    def listed(condition: str) -> set[str]:
        response = users.ListUsers(
            pb.ListUsersRequest(filter=f'email:"{prefix}*" AND {condition}', page_size=100)
        )
        assert response.total_size == len(response.users)
        return {u.email.split("@")[0].removeprefix(prefix + "-") for u in response.users}

    cutoff = _rfc3339(before_login)
    # Never logged in counts as older than any time: dormant-account hunting finds it.
    assert listed(f'last_login_time < "{cutoff}"') == {"never", "old"}
    assert listed(f"last_login_time <= {_rfc3339(long_ago)}") == {"never", "old"}
    assert listed(f"last_login_time >= {cutoff}") == {"active"}
    assert listed(f"last_login_time > {_rfc3339(long_ago)}") == {"active"}
    created = _rfc3339(before_creation)
    assert listed(f"password_change_time < {created}") == {"old"}
    assert listed(f"password_change_time >= {created}") == {"never", "active"}
    # Leaving out accounts created since: none of these is older.
    assert listed(f"last_login_time < {cutoff} AND create_time < {created}") == set()

    bad = failure_of(
        lambda: users.ListUsers(pb.ListUsersRequest(filter="last_login_time < last-tuesday"))
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(bad.violations) == ["filter"]
    assert "RFC 3339" in bad.violations["filter"]


# --- after DisableUser nothing works ----------------------------------------------------------


def test_after_disable_login_refresh_and_a_service_token_all_fail(
    auth: AuthServiceStub,
    channel: grpc.Channel,
    users: UserServiceStub,
    server: ServerThread,
) -> None:
    generic = anonymous_refusal(channel)
    person = create_user(users)
    pair = login_pair(channel, person.email)
    subject = f"lifecycle-{uuid.uuid4().hex[:8]}"
    service_token = service_token_for(server.settings, subject)
    as_service = UserServiceStub(channel)
    listing = pb.ListUsersRequest(page_size=1)
    assert code_of(lambda: as_service.ListUsers(listing, metadata=bearer(service_token))) == (
        grpc.StatusCode.OK
    )
    account = users.ListUsers(pb.ListUsersRequest(email=f"{subject}@service.invalid")).users[0]

    users.DisableUser(pb.DisableUserRequest(id=person.id))
    users.DisableUser(pb.DisableUserRequest(id=account.id))

    refusals = [
        failure_of(lambda: login_pair(channel, person.email)),
        failure_of(
            lambda: auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=pair.refresh_token))
        ),
        failure_of(
            lambda: as_service.GetUser(
                pb.GetUserRequest(id=person.id), metadata=bearer(pair.access_token)
            )
        ),
        failure_of(lambda: as_service.ListUsers(listing, metadata=bearer(service_token))),
    ]
    for refusal in refusals:
        assert (refusal.code, refusal.message, refusal.reason) == (
            generic.code,
            generic.message,
            generic.reason,
        )


# --- the dormant-account job ------------------------------------------------------------------


@pytest.fixture(params=("sqlite", "postgresql"))
def own_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this test's own: the job acts on every user it finds."""
    if request.param == "sqlite":
        with throwaway_sqlite() as url:
            yield url
    else:
        admin_url: str = request.getfixturevalue("postgres_admin_url")
        with throwaway_database(admin_url) as url:
            yield url


def _age(engine: Engine, user_id: str, *, days: int, logged_in: bool) -> None:
    then = datetime.now(UTC) - timedelta(days=days)
    values: dict[str, datetime] = {"create_time": then}
    if logged_in:
        values["last_login_time"] = then
    with engine.begin() as conn:
        conn.execute(
            update(users_table).where(users_table.c.id == uuid.UUID(user_id)).values(**values)
        )


def test_the_dormant_job_disables_like_disable_user(own_database: str) -> None:
    engine = sync_engine(own_database)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(own_database, data_dir)
        ensure_admin(settings, ADMIN_EMAIL)
        server = ServerThread(settings).start()
        try:
            with grpc.insecure_channel(server.address) as channel:
                admin = UserServiceStub(
                    with_bearer(channel, login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token)
                )
                generic = anonymous_refusal(channel)
                old_login = create_user(admin)
                never = create_user(admin)
                recent = create_user(admin)
                pair = login_pair(channel, old_login.email)
                login_pair(channel, recent.email)
                service_token = service_token_for(settings, f"dormant-{uuid.uuid4().hex[:6]}")
                _age(engine, old_login.id, days=100, logged_in=True)
                _age(engine, never.id, days=100, logged_in=False)
                _age(engine, recent.id, days=100, logged_in=False)  # but logged in just now
                # The service account was created long ago and never logged in: not dormant.
                with engine.begin() as conn:
                    conn.execute(
                        update(users_table)
                        .where(users_table.c.email.like("dormant-%@service.invalid"))
                        .values(create_time=datetime.now(UTC) - timedelta(days=100))
                    )

                assert server.running is not None
                # Off by default: no such background task.
                assert "dormant-users" not in {t.get_name() for t in server.running.background}
                job: UserService = server.running.components.users
                assert server.call(job.disable_dormant_users(days=90)) == 2

                states = {
                    u.id: u.state for u in admin.ListUsers(pb.ListUsersRequest(page_size=100)).users
                }
                assert states[old_login.id] == user_pb2.USER_STATE_DISABLED
                assert states[never.id] == user_pb2.USER_STATE_DISABLED
                assert states[recent.id] == user_pb2.USER_STATE_ACTIVE
                assert all(
                    state == user_pb2.USER_STATE_ACTIVE
                    for uid, state in states.items()
                    if uid not in (old_login.id, never.id)
                )
                event = _events(admin, old_login.id)[0]
                assert (event.action, event.actor) == ("user.disabled", "system")
                assert {c.field for c in event.changes} == {"state", "reason"}
                # As after DisableUser: its access token, refresh token and password all fail.
                stub = UserServiceStub(channel)
                for refused in (
                    lambda: stub.GetUser(
                        pb.GetUserRequest(id=old_login.id), metadata=bearer(pair.access_token)
                    ),
                    lambda: AuthServiceStub(channel).RefreshToken(
                        auth_pb.RefreshTokenRequest(refresh_token=pair.refresh_token)
                    ),
                    lambda: login_pair(channel, old_login.email),
                ):
                    details = failure_of(refused)
                    assert (details.code, details.reason) == (generic.code, generic.reason)
                # The service account's token still works.
                assert (
                    code_of(
                        lambda: stub.ListUsers(
                            pb.ListUsersRequest(page_size=1), metadata=bearer(service_token)
                        )
                    )
                    == grpc.StatusCode.OK
                )
        finally:
            server.stop()

        # Switched on by the setting, the server runs the job by itself once it is ready.
        late = _create_dormant(settings, engine)
        on = ServerThread(make_settings(own_database, data_dir, dormant_disable_days=90)).start()
        try:
            deadline = time.monotonic() + 20
            while user_row(engine, late)["state"] != "disabled":
                assert time.monotonic() < deadline, "the job did not run"
                time.sleep(0.05)
        finally:
            on.stop()
    engine.dispose()


def _create_dormant(settings: Settings, engine: Engine) -> str:
    """A user created through a short-lived server and aged 100 days; its id."""
    server = ServerThread(settings).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = UserServiceStub(
                with_bearer(channel, login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token)
            )
            user = create_user(admin, email=unique_email("dormant-late"))
    finally:
        server.stop()
    _age(engine, user.id, days=100, logged_in=False)
    return user.id
