"""The last check of the suite: no audit row written by any test holds a secret.

Named so that it is collected after every other end-to-end module, and not parametrized by
`database_url`, so pytest orders it after the tests of both backends. It reads every row of
audit_events on the session's SQLite and PostgreSQL databases and looks for the passwords the
tests used, Argon2 hashes, the stored password and refresh-token hashes, JWTs and refresh
tokens (see tests/secrets_registry.py for where each comes from).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid

import pytest
from sqlalchemy import select

from tests.e2e.integrity_helpers import row_text
from tests.secrets_registry import Detector, literal_secrets_in_tests, remember, remembered
from tests.support import ADMIN_PASSWORD, TEST_SECRET, mint_token, sync_engine
from usersvc.adapters.tables import audit_events, refresh_tokens, users

# Shorter stored "hashes" are markers such as the service accounts' "!service-account".
MIN_HASH_LENGTH = 20


def _scan(url: str) -> tuple[int, list[str]]:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(select(audit_events)).mappings())
            token_hashes = set(conn.execute(select(refresh_tokens.c.token_hash)).scalars())
            password_hashes = {
                h
                for h in conn.execute(select(users.c.password_hash)).scalars()
                if len(h) >= MIN_HASH_LENGTH
            }
    finally:
        engine.dispose()
    detector = Detector.for_suite(
        refresh_token_hashes=token_hashes,
        password_hashes=password_hashes,
        also=[ADMIN_PASSWORD, TEST_SECRET],
    )
    problems = [
        f"audit row {row['id']} ({row['action']}): {finding}"
        for row in rows
        for finding in detector.findings(row_text(row))
    ]
    return len(rows), problems


def _assert_clean(url: str) -> None:
    count, problems = _scan(url)
    if count == 0:
        pytest.skip("no audit rows: run this module together with the rest of the suite")
    assert problems == [], f"{len(problems)} findings in {count} audit rows"


def test_no_audit_row_on_sqlite_holds_a_secret(sqlite_url: str) -> None:
    _assert_clean(sqlite_url)


def test_no_audit_row_on_postgresql_holds_a_secret(postgres_url: str) -> None:
    _assert_clean(postgres_url)


# --- the scan can fail: the detector on planted rows ------------------------------------------


def _row(changes: dict[str, object], request_id: str = "req-1") -> str:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "user_id": str(uuid.uuid4()),
            "action": "user.updated",
            "changes": changes,
            "actor": str(uuid.uuid4()),
            "request_id": request_id,
            "create_time": "2030-01-01 12:00:00+00:00",
        }
    )


def test_the_sources_and_the_registry_supply_the_suites_passwords() -> None:
    literals = literal_secrets_in_tests().literals
    assert ADMIN_PASSWORD in literals
    assert "correct horse battery staple" in literals  # tests/e2e/test_users_api.py
    marker = f"registered-{uuid.uuid4().hex}"
    remember(marker)
    assert marker in remembered()


def test_the_detector_finds_every_kind_of_secret() -> None:
    refresh = secrets.token_urlsafe(32)
    stored_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
    detector = Detector(
        secrets=frozenset({"a password the suite used"}),
        refresh_token_hashes=frozenset({hashlib.sha256(refresh.encode()).hexdigest()}),
        password_hashes=frozenset({"pbkdf2:sha256:600000$salt$0123456789abcdef"}),
    )
    planted = {
        "password": {"new": "a password the suite used"},
        "argon2": {"new": stored_hash},
        "other hash": {"new": "pbkdf2:sha256:600000$salt$0123456789abcdef"},
        "jwt": {"new": mint_token(uuid.uuid4())},
        "refresh token": {"new": refresh},
        "refresh token hash": {"new": hashlib.sha256(refresh.encode()).hexdigest()},
    }
    for name, change in planted.items():
        assert detector.findings(_row({name: change})), name
    # f-string secrets of the sources become patterns.
    patterned = Detector(patterns=(re.compile(r"Sekret\-.+?"),))
    assert patterned.findings(_row({"email": {"new": f"Sekret-{uuid.uuid4().hex}"}}))


def test_the_detector_passes_ordinary_audit_rows() -> None:
    detector = Detector.for_suite()
    long_email = "a1b2c3d4e5@" + ".".join(["d" * 60] * 3) + "." + "c" * 60
    rows = [
        _row(
            {
                "email": {"old": None, "new": long_email},
                "name": {"old": None, "new": "n" * 100},
                "roles": {"old": None, "new": ["admin", "service"]},
                "state": {"old": None, "new": "active"},
                "password": {"old": "[REDACTED]", "new": "[REDACTED]"},
            },
            request_id=f"audit-create-{uuid.uuid4()}",
        ),
        _row({"outcome": {"old": None, "new": "wrong_password"}}, request_id=str(uuid.uuid4())),
        _row({"name": {"old": "Ada Lovelace", "new": "Grace Hopper"}}),
    ]
    for row in rows:
        assert detector.findings(row) == []
