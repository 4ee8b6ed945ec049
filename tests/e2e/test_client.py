"""The typed client of the API package against a real server: both flavours, errors, paging,
token refresh, retries, batches with per-entry errors, the one-time-code calls, and offline
token verification with the JWKS helper."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest

from tests.e2e.conftest import ADMIN_EMAIL
from tests.support import ADMIN_PASSWORD, ServerThread, mint_token
from userservice.client import (
    Aborted,
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from userservice.client.jwks import AsyncJwksVerifier, InvalidToken, JwksVerifier
from userservice.v1 import user_pb2, user_service_pb2

# The client's behaviour does not depend on the database; storage is tested on both elsewhere.
pytestmark = pytest.mark.one_backend


def _email(tag: str = "") -> str:
    return f"client-{tag}{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture(scope="module")
def admin_token(server: ServerThread) -> str:
    with Client(server.address) as anonymous:
        return anonymous.login(ADMIN_EMAIL, ADMIN_PASSWORD).access_token


@pytest.fixture
def client(server: ServerThread, admin_token: str) -> Iterator[Client]:
    with Client(server.address, token=lambda: admin_token) as c:
        yield c


def test_create_get_update_delete(client: Client) -> None:
    created = client.create_user(email=_email(), name="Ada", password="unusual-pass-4217")
    assert created.id and created.etag
    assert client.get_user(created.id) == created

    changed = client.update_user(
        user_pb2.User(id=created.id, name="Ada King", etag=created.etag), ["name"]
    )
    assert changed.name == "Ada King"
    assert changed.etag != created.etag

    with pytest.raises(Aborted) as stale:
        client.update_user(user_pb2.User(id=created.id, name="X Y", etag=created.etag), ["name"])
    assert stale.value.code == grpc.StatusCode.ABORTED
    assert stale.value.reason == "ETAG_MISMATCH"

    client.delete_user(created.id, etag=changed.etag)
    # Soft-deleted: an admin still reads it, as DELETED, and can bring it back.
    deleted = client.get_user(created.id)
    assert deleted.state == user_pb2.USER_STATE_DELETED
    with pytest.raises(NotFound) as gone:
        client.delete_user(created.id)
    assert gone.value.reason == "USER_NOT_FOUND"
    restored = client.undelete_user(created.id, etag=deleted.etag)
    assert restored.state == user_pb2.USER_STATE_ACTIVE


def test_create_without_request_id_gets_one_so_a_retry_is_safe(client: Client) -> None:
    email = _email()
    key = str(uuid.uuid4())
    first = client.create_user(
        email=email, name="Twice", password="unusual-pass-4217", request_id=key
    )
    again = client.create_user(
        email=email, name="Twice", password="unusual-pass-4217", request_id=key
    )
    assert again.id == first.id


def test_validation_failure_carries_every_detail(client: Client) -> None:
    with pytest.raises(InvalidArgument) as exc:
        client.create_user(email="nope", name="A", password="short")
    err = exc.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "INVALID_ARGUMENT"
    assert err.domain == "usersvc"
    assert set(err.violations) == {"email", "name", "password"}
    uuid.UUID(err.request_id)
    assert err.retry_delay is None


def test_labels_and_admin_metadata_go_in_and_the_filter_finds_them(client: Client) -> None:
    team = f"team-{uuid.uuid4().hex[:8]}"
    made = client.create_user(
        email=_email(),
        name="Labelled",
        password="unusual-pass-4217",
        labels={"team": team},
        admin_metadata={"note": "from the client"},
    )
    assert dict(made.labels) == {"team": team}
    assert made.admin_metadata["note"] == "from the client"
    found = list(client.iter_users(filter=f'labels.team = "{team}"'))
    assert [u.id for u in found] == [made.id]


def test_password_change_required_goes_in_on_create_and_out_on_update(client: Client) -> None:
    made = client.create_user(
        email=_email(),
        name="Must Change",
        password="unusual-pass-4217",
        password_change_required=True,
    )
    assert made.password_change_required
    cleared = client.update_user(
        user_pb2.User(id=made.id, password_change_required=False, etag=made.etag),
        ["password_change_required"],
    )
    assert not cleared.password_change_required


def test_batch_create_answers_each_entry_and_batch_get_reads_them_back(client: Client) -> None:
    first, second = _email("batch-"), _email("batch-")
    results = client.batch_create_users(
        [
            user_service_pb2.BatchCreateUserEntry(
                email=first, name="First", password="unusual-pass-4217"
            ),
            user_service_pb2.BatchCreateUserEntry(
                email="nope", name="Bad", password="unusual-pass-4217"
            ),
            user_service_pb2.BatchCreateUserEntry(
                email=second, name="Second", password="unusual-pass-4217", labels={"k": "v"}
            ),
            user_service_pb2.BatchCreateUserEntry(
                email=first, name="Again", password="unusual-pass-4217"
            ),
        ]
    )
    assert [r.ok for r in results] == [True, False, True, False]
    created = [r.user for r in results if r.user is not None]
    assert [u.email for u in created] == [first, second]
    assert dict(created[1].labels) == {"k": "v"}
    bad, taken = results[1].error, results[3].error
    assert isinstance(bad, InvalidArgument) and results[1].user is None
    assert bad.reason == "INVALID_ARGUMENT" and set(bad.violations) == {"users[1].email"}
    uuid.UUID(bad.request_id)
    assert isinstance(taken, AlreadyExists) and taken.reason == "EMAIL_TAKEN"

    ids = [created[1].id, created[0].id, created[1].id]
    assert [u.id for u in client.batch_get_users(ids).users] == ids
    unknown = str(uuid.uuid4())
    partial = client.batch_get_users([created[0].id, unknown], allow_missing=True)
    assert [u.email for u in partial.users] == [first]
    assert list(partial.missing_ids) == [unknown]
    with pytest.raises(NotFound):
        client.batch_get_users([created[0].id, unknown])


def test_one_time_code_calls_reach_the_server_and_map_its_errors(
    server: ServerThread, client: Client
) -> None:
    user = client.create_user(email=_email(), name="Coded", password="unusual-pass-4217")
    now = datetime.now(UTC)
    assert now < client.send_verification_email(user.id) <= now + timedelta(days=2)
    assert now < client.create_recovery_code(user.id) <= now + timedelta(days=1)
    with pytest.raises(NotFound):
        client.create_recovery_code(str(uuid.uuid4()))
    # Both redeeming calls need no token; a wrong code says only that it is wrong.
    with Client(server.address) as anonymous:
        with pytest.raises(InvalidArgument) as wrong:
            anonymous.verify_email(user.id, "x" * 43)
        assert wrong.value.reason == "INVALID_CODE"
        assert set(wrong.value.violations) == {"code"}
        with pytest.raises(InvalidArgument) as wrong:
            anonymous.recover_password(user.id, "x" * 43, new_password="recovered-pass-8812")
        assert wrong.value.reason == "INVALID_CODE"
        with pytest.raises(InvalidArgument) as malformed:
            anonymous.verify_email("not-a-uuid", "x" * 43)
        assert "user_id" in malformed.value.violations
    assert not client.get_user(user.id).email_verified


def test_iter_users_walks_every_page(client: Client) -> None:
    tag = uuid.uuid4().hex[:6]
    # One exact-email filter per user would be one page; instead walk everything and find ours.
    made = {
        client.create_user(email=_email(tag), name="Pager", password="unusual-pass-4217").id
        for _ in range(5)
    }
    seen = [u.id for u in client.iter_users(page_size=2)]
    assert len(seen) == len(set(seen)), "a user was returned twice"
    assert made <= set(seen)
    assert len(seen) > 2, "more than one page was read"


def test_token_is_asked_for_on_every_call(server: ServerThread, admin_token: str) -> None:
    handed_out: list[str] = []
    tokens = iter(["not-a-jwt", admin_token])

    def token() -> str:
        handed_out.append(next(tokens))
        return handed_out[-1]

    with Client(server.address, token=token) as c:
        with pytest.raises(Unauthenticated):
            c.list_users(page_size=1)
        assert len(c.list_users(page_size=1).users) == 1
    assert handed_out == ["not-a-jwt", admin_token]


async def test_async_client(server: ServerThread, admin_token: str) -> None:
    async with AsyncClient(server.address, token=lambda: admin_token) as c:
        created = await c.create_user(email=_email(), name="Async", password="unusual-pass-4217")
        assert (await c.get_user(created.id)).email == created.email
        ids = [u.id async for u in c.iter_users(page_size=3)]
        assert created.id in ids
        stream = await c.watch_user_events(timeout=10)
        renamed = await c.update_user(
            user_pb2.User(id=created.id, name="Async Watched", etag=created.etag), ["name"]
        )
        async for event in stream:
            if event.user_id == created.id:
                break
        assert event.user.name == renamed.name
        stream.cancel()
        with pytest.raises(InvalidArgument) as exc:
            await c.get_user("not-a-uuid")
        assert "id" in exc.value.violations
        uuid.UUID(exc.value.request_id)

        # All or nothing: the bad entry fails, the good one is aborted, nobody is written.
        email = _email("async-batch-")
        key = str(uuid.uuid4())
        entries = [
            user_service_pb2.BatchCreateUserEntry(
                email=email, name="Async Batch", password="unusual-pass-4217"
            ),
            user_service_pb2.BatchCreateUserEntry(
                email="nope", name="Bad", password="unusual-pass-4217"
            ),
        ]
        results = await c.batch_create_users(entries, all_or_nothing=True, request_id=key)
        assert [type(r.error) for r in results] == [Aborted, InvalidArgument]
        assert results[0].error is not None and results[0].error.reason == "BATCH_ABORTED"
        assert not (await c.list_users(email=email)).users
        (made,) = await c.batch_create_users(entries[:1], request_id=str(uuid.uuid4()))
        assert made.user is not None and made.user.email == email
        got = await c.batch_get_users([made.user.id, created.id])
        assert [u.email for u in got.users] == [email, created.email]

        assert await c.create_recovery_code(created.id) > datetime.now(UTC)
        assert await c.send_verification_email(created.id) > datetime.now(UTC)
    async with AsyncClient(server.address) as anonymous:
        with pytest.raises(InvalidArgument) as wrong:
            await anonymous.verify_email(created.id, "x" * 43)
        assert wrong.value.reason == "INVALID_CODE"
        with pytest.raises(InvalidArgument) as wrong:
            await anonymous.recover_password(
                created.id, "x" * 43, new_password="recovered-pass-8812"
            )
        assert wrong.value.reason == "INVALID_CODE"


def test_watch_user_events_yields_events_and_resumes_from_its_token(client: Client) -> None:
    stream = client.watch_user_events(timeout=10)
    start = stream.resume_token
    created = client.create_user(
        email=_email("watch"), name="Watched", password="unusual-pass-4217"
    )
    event = next(e for e in stream if e.user_id == created.id)
    assert event.type == user_service_pb2.USER_EVENT_TYPE_CREATED
    assert event.user.email == created.email
    assert stream.resume_token != start
    stream.cancel()
    again = client.watch_user_events(after=start, timeout=10)
    assert next(e for e in again if e.user_id == created.id) == event
    again.cancel()
    with pytest.raises(InvalidArgument) as bad:
        client.watch_user_events(after="garbage")
    assert "after" in bad.value.violations


def test_watch_user_events_outlives_the_clients_call_deadline(
    server: ServerThread, admin_token: str, client: Client
) -> None:
    with Client(server.address, token=lambda: admin_token, timeout=0.3) as short:
        stream = short.watch_user_events()
        time.sleep(0.6)
        created = client.create_user(
            email=_email("late"), name="Late", password="unusual-pass-4217"
        )
        assert any(e.user_id == created.id for e in stream)
        stream.cancel()


def test_jwks_verifier_checks_tokens_offline(server: ServerThread, admin_token: str) -> None:
    with Client(server.address) as c:
        verifier = JwksVerifier(c.get_jwks)
        claims = verifier.verify(admin_token)
        assert claims["typ"] == "access"
        assert "admin" in claims["roles"]
        verifier.verify(admin_token)
        assert verifier.fetches == 1, "keys are cached by kid"

        with pytest.raises(InvalidToken):
            JwksVerifier(c.get_jwks, audience="someone-else").verify(admin_token)
        with pytest.raises(InvalidToken):
            verifier.verify(jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256"))


def test_jwks_verifier_refreshes_on_unknown_kid_at_most_once_per_interval(
    server: ServerThread, admin_token: str
) -> None:
    now = [0.0]
    with Client(server.address) as c:
        verifier = JwksVerifier(c.get_jwks, min_refresh_interval=30, clock=lambda: now[0])
        verifier.verify(admin_token)
        forged = _with_kid(admin_token, "rotated-away")
        for _ in range(5):
            with pytest.raises(InvalidToken):
                verifier.verify(forged)
        assert verifier.fetches == 1, "refreshes on an unknown kid are rate-limited"
        now[0] = 31.0
        with pytest.raises(InvalidToken):
            verifier.verify(forged)
        assert verifier.fetches == 2


async def test_async_jwks_verifier(server: ServerThread, admin_token: str) -> None:
    async with AsyncClient(server.address) as c:
        verifier = AsyncJwksVerifier(c.get_jwks)
        assert (await verifier.verify(admin_token))["typ"] == "access"
        with pytest.raises(InvalidToken):
            await verifier.verify(mint_token(uuid.uuid4()).replace("e", "f", 1) + "x")


def _with_kid(token: str, kid: str) -> str:
    """The token with another kid in its header (so its signature no longer matters)."""
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    header["kid"] = kid
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}.{signature}"
