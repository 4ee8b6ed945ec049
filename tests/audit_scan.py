"""The end-of-session check: no audit row written by any test holds a secret.

Run by the session finalizer of each database (tests/conftest.py), after every test that used
it. It reads every row of audit_events and looks for the passwords the tests used, Argon2
hashes, the stored password and refresh-token hashes, JWTs and refresh tokens (see
tests/secrets_registry.py for where each comes from).
"""

from __future__ import annotations

from sqlalchemy import select

from tests.e2e.integrity_helpers import row_text
from tests.secrets_registry import Detector
from tests.support import ADMIN_PASSWORD, TEST_SECRET, sync_engine
from usersvc.adapters.tables import audit_events, refresh_tokens, users

# Shorter stored "hashes" are markers such as the service accounts' "!service-account".
MIN_HASH_LENGTH = 20


def scan(url: str) -> tuple[int, list[str]]:
    """How many audit rows the database holds, and every secret found in them."""
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
