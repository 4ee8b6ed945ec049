"""Settings: read from USERSVC_* variables; production refuses to start without real secrets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from usersvc.config import DEFAULT_DATA_DIR, Settings

GOOD_SECRET = "9c1f7d2b8e4a6f03b5d7e9a1c3f5b7d9e1a3c5f7"
PG_URL = "postgresql+psycopg://usersvc@db.internal/usersvc"
JWT_KEY_FILE = "/run/secrets/usersvc-jwt.pem"
# Everything production requires besides the secret and the database.
PRODUCTION_EXTRAS = {"jwt_signing_key_file": JWT_KEY_FILE}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No USERSVC_* variable of the machine running the tests leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("USERSVC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # in case a later version reads a .env file


def production(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "production",
        "secret_key": GOOD_SECRET,
        "database_url": PG_URL,
        **PRODUCTION_EXTRAS,
    }
    values.update(overrides)
    return Settings(**values)


def _set_production_environment(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    defaults = {
        "environment": "production",
        "secret_key": GOOD_SECRET,
        "database_url": PG_URL,
        **PRODUCTION_EXTRAS,
    }
    for name, value in {**defaults, **values}.items():
        monkeypatch.setenv(f"USERSVC_{name.upper()}", value)


@pytest.mark.parametrize(
    "secret",
    ["", "short", "k" * 31, "k" * 32, " " * 40, "changeme" * 4, "secret", "🔑" * 31],
)
def test_production_refuses_an_empty_short_or_placeholder_secret(secret: str) -> None:
    with pytest.raises(ValidationError, match="USERSVC_SECRET_KEY"):
        production(secret_key=secret)


def test_production_refuses_an_empty_database_url() -> None:
    with pytest.raises(ValidationError, match="USERSVC_DATABASE_URL"):
        production(database_url="")


def test_production_accepts_a_32_character_secret_and_a_database_url() -> None:
    settings = production()
    assert settings.environment == "production"
    assert settings.secret_key.get_secret_value() == GOOD_SECRET
    assert settings.effective_database_url == PG_URL


def test_development_needs_no_secret_and_no_database_url() -> None:
    settings = Settings()
    assert settings.environment == "development"
    assert settings.secret_key.get_secret_value() == ""
    assert settings.database_url == ""


def test_development_default_database_is_sqlite_under_the_default_data_dir() -> None:
    settings = Settings()
    assert settings.data_dir == DEFAULT_DATA_DIR
    url = make_url(settings.effective_database_url)
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == str(DEFAULT_DATA_DIR / "usersvc.sqlite3")


def test_development_default_database_is_sqlite_under_a_given_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "state dir"  # a space must not break the URL
    url = make_url(Settings(data_dir=data_dir).effective_database_url)
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database is not None
    assert Path(url.database) == data_dir / "usersvc.sqlite3"
    assert Path(url.database).is_absolute()


def test_an_explicit_database_url_wins_over_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=PG_URL)
    assert settings.effective_database_url == PG_URL


def test_environment_variables_with_the_usersvc_prefix_are_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _set_production_environment(monkeypatch)
    monkeypatch.setenv("USERSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("USERSVC_DB_POOL_SIZE", "7")
    monkeypatch.setenv("USERSVC_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("USERSVC_REFLECTION", "false")
    settings = Settings()
    assert settings.environment == "production"
    assert settings.secret_key.get_secret_value() == GOOD_SECRET
    assert settings.database_url == PG_URL
    assert settings.data_dir == tmp_path
    assert settings.db_pool_size == 7
    assert settings.log_level == "DEBUG"
    assert settings.reflection is False


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", PG_URL)
    monkeypatch.setenv("SECRET_KEY", GOOD_SECRET)
    monkeypatch.setenv("ENVIRONMENT", "production")
    settings = Settings()
    assert settings.environment == "development"
    assert settings.database_url == ""
    assert settings.secret_key.get_secret_value() == ""


def test_production_from_the_environment_refuses_a_short_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _set_production_environment(monkeypatch, secret_key="too-short")
    with pytest.raises(ValidationError, match="USERSVC_SECRET_KEY"):
        Settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("USERSVC_ENVIRONMENT", "staging"),
        ("USERSVC_LOG_LEVEL", "CHATTY"),
        ("USERSVC_DB_POOL_SIZE", "0"),
        ("USERSVC_ARGON2_MEMORY_KIB", "1024"),  # below the OWASP minimum
        ("USERSVC_ARGON2_TIME_COST", "1"),
        ("USERSVC_DORMANT_DISABLE_DAYS", "-1"),
        ("USERSVC_DORMANT_DISABLE_DAYS", "ninety"),
    ],
)
def test_out_of_range_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_the_secret_is_not_shown_in_the_settings_repr() -> None:
    settings = production()
    assert GOOD_SECRET not in repr(settings)
    assert GOOD_SECRET not in str(settings)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.environment = "production"  # type: ignore[misc]


def _shows_part_of(secret: str, text: str) -> bool:
    # pydantic shortens long inputs in the middle, so look for any 8 characters of the secret.
    return any(secret[i : i + 8] in text for i in range(len(secret) - 7))


@pytest.mark.parametrize(
    ("extra", "secret_name"),
    [({}, "secret_key"), ({"smtp_password": "smtp-password-value"}, "smtp_password")],
    ids=["secret_key", "smtp_password"],
)
def test_a_settings_error_shows_no_secret(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], secret_name: str
) -> None:
    short_secret = "my-real-but-short-secret"
    monkeypatch.setenv("USERSVC_ENVIRONMENT", "production")
    monkeypatch.setenv("USERSVC_SECRET_KEY", short_secret)
    for name, value in extra.items():
        monkeypatch.setenv(f"USERSVC_{name.upper()}", value)
    with pytest.raises(ValidationError) as err:
        Settings()
    secret = short_secret if secret_name == "secret_key" else extra[secret_name]
    assert not _shows_part_of(secret, str(err.value))


def test_an_outbox_lease_not_longer_than_the_smtp_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="USERSVC_OUTBOX_LEASE_SECONDS"):
        Settings(smtp_host="127.0.0.1", smtp_timeout_seconds=30, outbox_lease_seconds=20)
    with pytest.raises(ValidationError, match="LEASE"):
        Settings(smtp_timeout_seconds=10, outbox_lease_seconds=10)
    assert Settings(smtp_timeout_seconds=10, outbox_lease_seconds=10.5).outbox_lease_seconds == 10.5


def test_the_dormant_account_job_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().dormant_disable_days == 0
    monkeypatch.setenv("USERSVC_DORMANT_DISABLE_DAYS", "90")
    assert Settings().dormant_disable_days == 90
