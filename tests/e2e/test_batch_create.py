"""BatchCreateUsers through real stubs, on SQLite and PostgreSQL: per-entry statuses,
all-or-nothing, retries, and imported password hashes that log in and get re-hashed."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import ColumnElement, Table, func, select, text
from sqlalchemy.engine import Engine

from tests.e2e.auth_helpers import code_of, failure_of
from tests.e2e.conftest import CapturedLogs
from tests.password_hash_samples import FORMATS, bcrypt_hash, passlib_pbkdf2
from tests.secrets_registry import Detector, remember
from tests.support import ADMIN_PASSWORD, TEST_SECRET
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import audit_events, outbox, user_events
from usersvc.adapters.tables import users as users_table

PASSWORD = "imported pass phrase 7731"
WRONG_PASSWORD = "imported pass phrase 7732"
OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


def email(prefix: str = "batch") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


def entry(
    address: str | None = None,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    name: str = "Imported User",
    roles: tuple[str, ...] = (),
) -> pb.BatchCreateUserEntry:
    made = pb.BatchCreateUserEntry(email=address or email(), name=name, roles=list(roles))
    if password_hash is not None:
        made.password_hash = password_hash
    elif password is not None:
        made.password = password
    return made


def details(status: status_pb2.Status) -> tuple[str, dict[str, str]]:
    """(ErrorInfo reason, {field: description}) of an entry's status."""
    reason, fields = "", {}
    for detail in status.details:
        assert isinstance(detail, any_pb2.Any)
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    return reason, fields


def count(db: Engine, table: Table, *where: ColumnElement[bool]) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def written(db: Engine) -> tuple[int, int, int, int]:
    """Rows of every table a created user writes to."""
    return (
        count(db, users_table),
        count(db, audit_events),
        count(db, outbox),
        count(db, user_events),
    )


def stored_hash(db: Engine, address: str) -> str:
    with db.connect() as conn:
        value = conn.execute(
            select(users_table.c.password_hash).where(users_table.c.email == address)
        ).scalar_one()
    assert isinstance(value, str)
    return value


def test_a_mixed_batch_answers_each_entry_and_creates_the_valid_ones(
    users: UserServiceStub, db: Engine
) -> None:
    taken = email("taken")
    users.CreateUser(pb.CreateUserRequest(email=taken, name="Taken", password=PASSWORD))
    twice = email("twice")
    password_hash = bcrypt_hash(PASSWORD)
    entries = [
        entry(password=PASSWORD),  # 0 created
        entry(password_hash=password_hash),  # 1 created
        entry("not an address", password=PASSWORD),  # 2 bad e-mail
        entry(password_hash="$md5$nope"),  # 3 unknown hash format
        entry(twice, password=PASSWORD),  # 4 created
        entry(twice.upper(), password=PASSWORD),  # 5 same address as entry 4
        entry(taken, password=PASSWORD),  # 6 taken by a stored user
        entry(roles=("service",), password=PASSWORD),  # 7 a role the admin does not hold
        entry(name="A"),  # 8 no credential, name too short
    ]
    results = users.BatchCreateUsers(pb.BatchCreateUsersRequest(users=entries)).results
    assert [r.status.code for r in results] == [
        OK,
        OK,
        INVALID_ARGUMENT,
        INVALID_ARGUMENT,
        OK,
        ALREADY_EXISTS,
        ALREADY_EXISTS,
        PERMISSION_DENIED,
        INVALID_ARGUMENT,
    ]
    assert [r.HasField("user") for r in results] == [r.status.code == OK for r in results]
    for index in (0, 1, 4):
        user = results[index].user
        assert user.email == entries[index].email.lower()
        assert user.password_change_time == user.create_time  # set at creation
        assert users.GetUser(pb.GetUserRequest(id=user.id)).user == user
    assert list(details(results[2].status)[1]) == ["users[2].email"]
    reason, fields = details(results[3].status)
    assert reason == "INVALID_ARGUMENT"
    assert list(fields) == ["users[3].password_hash"]
    assert "unknown password hash format" in fields["users[3].password_hash"]
    assert details(results[5].status)[0] == "EMAIL_TAKEN"
    assert details(results[6].status)[0] == "EMAIL_TAKEN"
    assert details(results[7].status)[0] == "PERMISSION_DENIED"
    assert set(details(results[8].status)[1]) == {"users[8].name", "users[8].password"}
    # One audit record and one welcome message per created user, none for the others.
    created = [uuid.UUID(results[i].user.id) for i in (0, 1, 4)]
    assert count(db, audit_events, audit_events.c.user_id.in_(created)) == 3
    assert count(db, outbox, outbox.c.aggregate_id.in_(created)) == 3
    # And one change-feed event each (WatchUserEvents), written in the same transaction.
    assert count(db, user_events, user_events.c.user_id.in_(created)) == 3
    for index in (2, 3, 7, 8):
        assert count(db, users_table, users_table.c.email == entries[index].email.lower()) == 0
    # No hash in the answer, whichever entry it came with.
    assert password_hash not in str(results)
    assert "$md5$nope" not in str(results)


def test_all_or_nothing_writes_nothing_when_one_entry_fails(
    users: UserServiceStub, db: Engine
) -> None:
    entries = [
        entry(password=PASSWORD),
        entry(password_hash=passlib_pbkdf2(PASSWORD)),
        entry(password_hash="$2b$31$" + "a" * 53),  # bcrypt cost above the bound
        entry(password=PASSWORD),
    ]
    before = written(db)
    results = users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(users=entries, all_or_nothing=True)
    ).results
    assert [r.status.code for r in results] == [ABORTED, ABORTED, INVALID_ARGUMENT, ABORTED]
    assert [details(r.status)[0] for r in results] == [
        "BATCH_ABORTED",
        "BATCH_ABORTED",
        "INVALID_ARGUMENT",
        "BATCH_ABORTED",
    ]
    assert "bcrypt cost must be 4 to 16" in details(results[2].status)[1]["users[2].password_hash"]
    assert not any(r.HasField("user") for r in results)
    assert written(db) == before

    # A taken e-mail found only by the database aborts the batch the same way.
    taken = email("aon-taken")
    users.CreateUser(pb.CreateUserRequest(email=taken, name="Taken", password=PASSWORD))
    before = written(db)
    results = users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(
            users=[entry(password=PASSWORD), entry(taken, password=PASSWORD)],
            all_or_nothing=True,
        )
    ).results
    assert [r.status.code for r in results] == [ABORTED, ALREADY_EXISTS]
    assert written(db) == before

    # And with every entry valid, all are written.
    results = users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(
            users=[entry(password=PASSWORD), entry(password_hash=bcrypt_hash(PASSWORD))],
            all_or_nothing=True,
        )
    ).results
    assert [r.status.code for r in results] == [OK, OK]


def test_a_retry_with_the_same_request_id_creates_nothing_twice(
    users: UserServiceStub, db: Engine
) -> None:
    request_id = str(uuid.uuid4())
    request = pb.BatchCreateUsersRequest(
        users=[
            entry(password=PASSWORD),
            entry(password_hash=bcrypt_hash(PASSWORD)),
            entry("bad", password=PASSWORD),
        ],
        request_id=request_id,
    )
    first = users.BatchCreateUsers(request)
    assert [r.status.code for r in first.results] == [OK, OK, INVALID_ARGUMENT]
    before = written(db)
    again = users.BatchCreateUsers(request)
    assert [r.status.code for r in again.results] == [OK, OK, INVALID_ARGUMENT]
    assert [r.user for r in again.results] == [r.user for r in first.results]
    assert details(again.results[2].status)[1] == details(first.results[2].status)[1]
    assert written(db) == before

    changed = pb.BatchCreateUsersRequest(
        users=[entry(password=PASSWORD)], request_id=request_id.upper()
    )
    failure = failure_of(lambda: users.BatchCreateUsers(changed))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "REQUEST_ID_REUSED"
    assert count(db, users_table) == before[0]


@pytest.mark.parametrize("hash_format", sorted(FORMATS))
def test_each_imported_format_logs_in_and_is_rehashed_to_argon2id(
    hash_format: str, users: UserServiceStub, channel: grpc.Channel, db: Engine
) -> None:
    address = email(f"import-{hash_format}")
    password_hash = FORMATS[hash_format](PASSWORD)
    (result,) = users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(users=[entry(address, password_hash=password_hash)])
    ).results
    assert result.status.code == OK, result.status
    assert stored_hash(db, address) == password_hash  # stored as it came
    auth = AuthServiceStub(channel)
    wrong = pb_login(address, WRONG_PASSWORD)
    assert code_of(lambda: auth.Login(wrong)) == grpc.StatusCode.UNAUTHENTICATED
    assert stored_hash(db, address) == password_hash
    assert auth.Login(pb_login(address, PASSWORD)).tokens.access_token
    rehashed = stored_hash(db, address)
    assert rehashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    # The new hash verifies the same password; the old one is gone.
    assert auth.Login(pb_login(address, PASSWORD)).tokens.access_token
    assert stored_hash(db, address) == rehashed
    assert code_of(lambda: auth.Login(wrong)) == grpc.StatusCode.UNAUTHENTICATED


def pb_login(address: str, password: str) -> auth_pb.LoginRequest:
    return auth_pb.LoginRequest(email=address, password=password)


REFUSED_HASHES: dict[str, tuple[Callable[[], str], str]] = {
    "empty": (lambda: "", "password_hash is empty"),
    "unknown": (lambda: "{SSHA}c2FsdHNhbHRzYWx0", "unknown password hash format"),
    "plain md5": (lambda: "5f4dcc3b5aa765d61d8327deb882cf99", "unknown password hash format"),
    "bcrypt too short": (lambda: "$2b$10$abc", "malformed bcrypt hash"),
    "bcrypt 2x": (lambda: "$2x$10$" + "a" * 53, "malformed bcrypt hash"),
    "bcrypt cost 17": (lambda: "$2b$17$" + "a" * 53, "bcrypt cost must be 4 to 16"),
    "argon2 1 GiB + 1 KiB": (
        lambda: "$argon2id$v=19$m=1048577,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "argon2 memory",
    ),
    "argon2 t=21": (
        lambda: "$argon2id$v=19$m=65536,t=21,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "argon2 time cost",
    ),
    "argon2 v=16": (
        lambda: "$argon2id$v=16$m=65536,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "version 19",
    ),
    "argon2 no version": (
        lambda: "$argon2id$m=65536,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "malformed argon2 hash",
    ),
    "pbkdf2 999 iterations": (lambda: passlib_pbkdf2(PASSWORD, 999), "iterations must be"),
    "pbkdf2 10,000,001 iterations": (
        lambda: "$pbkdf2-sha256$10000001$c2FsdHNhbHRzYWx0$" + "a" * 43,
        "iterations must be",
    ),
    "django pbkdf2 bad base64": (
        lambda: "pbkdf2_sha256$600000$saltsaltsalt$not*base64",
        "malformed pbkdf2_sha256 hash",
    ),
    "pbkdf2 short salt": (
        lambda: "$pbkdf2-sha256$29000$c2FsdA$" + "a" * 43,
        "salt must be at least 8 bytes",
    ),
}


def test_malformed_unknown_and_absurd_hashes_are_refused_per_entry(
    users: UserServiceStub, db: Engine
) -> None:
    names = sorted(REFUSED_HASHES)
    hashes = [REFUSED_HASHES[n][0]() for n in names]
    entries = [entry(password_hash=h) for h in hashes]
    entries.append(entry(password_hash=bcrypt_hash(PASSWORD)))  # the one good entry
    results = users.BatchCreateUsers(pb.BatchCreateUsersRequest(users=entries)).results
    assert [r.status.code for r in results] == [INVALID_ARGUMENT] * len(names) + [OK]
    for index, name in enumerate(names):
        _, fields = details(results[index].status)
        field = f"users[{index}].password_hash"
        assert list(fields) == [field], name
        assert REFUSED_HASHES[name][1] in fields[field], (name, fields[field])
        assert count(db, users_table, users_table.c.email == entries[index].email) == 0
    answer = str(results)
    for refused in hashes:
        if len(refused) >= 8:
            assert refused not in answer


def test_more_than_a_thousand_entries_or_none_are_refused_whole(
    users: UserServiceStub, db: Engine
) -> None:
    before = count(db, users_table)
    many = [
        entry(f"many-{i}-{uuid.uuid4().hex[:6]}@example.com", password=PASSWORD)
        for i in range(1001)
    ]
    failure = failure_of(lambda: users.BatchCreateUsers(pb.BatchCreateUsersRequest(users=many)))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "users" in failure.violations
    assert "1000" in failure.violations["users"]
    failure = failure_of(lambda: users.BatchCreateUsers(pb.BatchCreateUsersRequest()))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert list(failure.violations) == ["users"]
    assert count(db, users_table) == before


@pytest.mark.one_backend
def test_no_hash_reaches_a_log_line_or_the_audit_trail(
    users: UserServiceStub, channel: grpc.Channel, db: Engine, logs: CapturedLogs
) -> None:
    imported = {name: make(PASSWORD) for name, make in FORMATS.items()}
    refused = "$2b$17$" + "b" * 53
    remember(*imported.values(), refused)
    addresses = {name: email(f"scan-{name}") for name in imported}
    results = users.BatchCreateUsers(
        pb.BatchCreateUsersRequest(
            users=[entry(addresses[n], password_hash=h) for n, h in imported.items()]
            + [entry(password_hash=refused)]
        )
    ).results
    assert [r.status.code for r in results] == [OK] * len(imported) + [INVALID_ARGUMENT]
    auth = AuthServiceStub(channel)
    for address in addresses.values():
        auth.Login(pb_login(address, PASSWORD))
    detector = Detector.for_suite(also=[ADMIN_PASSWORD, TEST_SECRET, PASSWORD])
    assert detector.findings(logs.text) == []
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT changes FROM audit_events WHERE request_id <> '' ORDER BY create_time DESC"
            )
        ).fetchmany(200)
    audit_text = " ".join(str(r[0]) for r in rows)
    assert detector.findings(audit_text) == []
    assert "password_format" in audit_text  # the import is audited with its format only
    # The scan can fail: a hash in the text is found.
    assert detector.findings(logs.text + imported["bcrypt-2b"])
