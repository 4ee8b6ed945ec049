"""Start-up and operator errors: one line per problem naming the variable, exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.auth_helpers import cli_env, run_cli


def _bare_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    env["USERSVC_DATA_DIR"] = str(tmp_path / "data")
    env.update(values)
    return env


def _problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("usersvc: ")]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("USERSVC_LISTEN_ADDRESS", "127.0.0.1:99999", "0 to 65535"),
        ("USERSVC_LISTEN_ADDRESS", "127.0.0.1:-1", "0 to 65535"),
        ("USERSVC_LISTEN_ADDRESS", "no-port", "host:port"),
        ("USERSVC_DATABASE_URL", "notaurl", "not a database URL"),
        ("USERSVC_DATABASE_URL", "mysql://root:hunter2@db/users", "unsupported database"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    result = run_cli(["serve"], _bare_env(tmp_path, **{variable: value}))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problems = _problems(result.stderr)
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(f"usersvc: {variable}: ")
    assert says in problems[0]
    assert "hunter2" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_production_reports_every_problem_in_one_run(tmp_path: Path) -> None:
    env = _bare_env(tmp_path, USERSVC_ENVIRONMENT="production", USERSVC_LOG_LEVEL="CHATTY")
    result = run_cli(["serve"], env)
    assert result.returncode == 2
    text = result.stderr
    for name in (
        "USERSVC_LOG_LEVEL",
        "USERSVC_SECRET_KEY",
        "USERSVC_DATABASE_URL",
        "USERSVC_JWT_SIGNING_KEY_FILE",
    ):
        assert sum(name in line for line in _problems(text)) == 1, (name, text)
    assert "pydantic" not in text
    assert "log_level" not in text
    assert "Traceback" not in text


def test_an_unusable_listen_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = _bare_env(tmp_path, USERSVC_LISTEN_ADDRESS="256.1.1.1:50051")
    result = run_cli(["serve"], env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    problems = _problems(result.stderr)
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith("usersvc: USERSVC_LISTEN_ADDRESS: ")


@pytest.mark.parametrize("command", ["create-admin", "issue-service-token"])
def test_operator_commands_refuse_an_unmigrated_database(tmp_path: Path, command: str) -> None:
    args = (
        [command, "--email", "root@example.com", "--name", "Root"]
        if command == "create-admin"
        else [command, "--subject", "billing"]
    )
    env = _bare_env(tmp_path)
    result = run_cli(args, env, stdin="a long enough password\n")
    assert result.returncode == 2, result.stderr
    assert "run usersvc migrate" in _problems(result.stderr)[-1]
    # Nothing was created: no database file, no development key, no secret.
    assert not (tmp_path / "data").exists()
    # The log says which data directory and database it looked at, as absolute paths.
    assert str((tmp_path / "data").resolve()) in result.stderr


def test_operator_commands_refuse_a_database_behind_the_code(
    tmp_path: Path, sqlite_url: str
) -> None:
    from sqlalchemy import text

    from tests.support import sync_engine
    from usersvc.migrate import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path}/old.sqlite3"
    upgrade(url, "0001")
    env = cli_env(url, str(tmp_path / "data"))
    result = run_cli(["issue-service-token", "--subject", "billing"], env)
    assert result.returncode == 2
    assert "run usersvc migrate" in result.stderr
    with sync_engine(url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"


def test_version_and_help(tmp_path: Path) -> None:
    result = run_cli(["--version"], _bare_env(tmp_path))
    assert result.returncode == 0
    assert result.stdout.startswith("usersvc ")
    help_text = run_cli(["--help"], _bare_env(tmp_path)).stdout
    assert "README" in help_text
    for name in ("USERSVC_DATABASE_URL", "USERSVC_MAX_CONCURRENT_RPCS", "USERSVC_LISTEN_ADDRESS"):
        assert name in help_text


def test_service_token_lifetime_is_capped_by_a_setting(tmp_path: Path, sqlite_url: str) -> None:
    env = cli_env(sqlite_url, str(tmp_path))
    refused = run_cli(["issue-service-token", "--subject", "billing", "--ttl", "3650d"], env)
    assert refused.returncode == 2
    assert "USERSVC_SERVICE_TOKEN_MAX_TTL_SECONDS" in refused.stderr
    allowed = run_cli(
        ["issue-service-token", "--subject", "billing", "--ttl", "3650d"],
        {**env, "USERSVC_SERVICE_TOKEN_MAX_TTL_SECONDS": str(3650 * 86400)},
    )
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.count(".") == 2  # a JWT
