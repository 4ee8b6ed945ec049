"""The audit scan can fail: its detector on planted and on ordinary rows.

The scan itself runs at the end of the session, once per database (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid

from tests.secrets_registry import Detector, literal_secrets_in_tests, remember, remembered
from tests.support import ADMIN_PASSWORD, mint_token


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
        # Imported hash shapes, found even when not stored (an entry that failed to import).
        "bcrypt": {"new": "$2b$12$" + "a" * 53},
        "passlib pbkdf2": {"new": "$pbkdf2-sha256$29000$c2FsdA$aGFzaA"},
        "django pbkdf2": {"new": "pbkdf2_sha256$870000$salt$aGFzaA=="},
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
