"""One typed settings object, read from USERSVC_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATA_DIR = Path(".data")
ENV_PREFIX = "USERSVC_"
# Database URL schemes and the async driver each one is served with.
DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


def parse_listen_address(value: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port"; ValueError naming what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"host {host!r} has unbalanced brackets")
    return host, int(port)


def production_problems(values: Mapping[str, Any]) -> list[str]:
    """Every production requirement `values` (field name -> value) misses, by variable name."""
    if str(values.get("environment", "")) != "production":
        return []
    problems: list[str] = []
    secret = values.get("secret_key") or ""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    # Length and variety: refuses placeholders such as "changeme" or 32 times "k".
    if len(secret) < 32 or len(set(secret)) < 12:
        problems.append(
            "USERSVC_SECRET_KEY must be set to at least 32 random characters in production"
        )
    if not values.get("database_url"):
        problems.append("USERSVC_DATABASE_URL must be set in production")
    if not values.get("jwt_signing_key_file"):
        problems.append("USERSVC_JWT_SIGNING_KEY_FILE must be set in production")
    return problems


def settings_problems(err: ValidationError, environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per problem, each naming its environment variable; never the input value.

    When a field is invalid pydantic skips the production checks, so they are run here on
    the raw environment too: an operator sees everything to fix in one run.
    """
    lines: list[str] = []
    for error in err.errors(include_url=False, include_input=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            lines.append(f"{ENV_PREFIX}{str(error['loc'][0]).upper()}: {message}")
        else:
            lines.extend(message.splitlines())
    raw = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX)
    }
    lines.extend(p for p in production_problems(raw) if p not in lines)
    return lines


class Settings(BaseSettings):
    """Every setting of the service; each is documented in the README."""

    # hide_input_in_errors: a refused secret must not be echoed in the error message.
    model_config = SettingsConfigDict(
        env_prefix="USERSVC_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    environment: Literal["development", "production"] = "development"
    listen_address: str = "127.0.0.1:50051"
    # Server processes sharing the listen address (SO_REUSEPORT); one per core is typical.
    workers: int = Field(default=1, ge=1, le=64)
    # Empty: an embedded SQLite file under data_dir.
    database_url: str = ""
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # uvloop where installed (less CPU per call), else the standard asyncio loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Seconds health reports NOT_SERVING before the listener closes, so that load balancers
    # and probes stop sending new calls first.
    shutdown_drain_seconds: float = Field(default=0.0, ge=0)
    # Secret that authenticates and encrypts page tokens. Empty in development: generated
    # once into data_dir. Required in production.
    secret_key: SecretStr = SecretStr("")
    db_pool_size: int = Field(default=10, ge=1)
    # Connection and call limits, so that idle or hostile clients cannot hold resources
    # without bound. Calls beyond max_concurrent_rpcs are refused with RESOURCE_EXHAUSTED
    # at once rather than queued.
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    max_concurrent_streams: int = Field(default=100, ge=1)
    max_connection_idle_seconds: float = Field(default=300.0, gt=0)
    max_connection_age_seconds: float = Field(default=3600.0, gt=0)
    max_connection_age_grace_seconds: float = Field(default=30.0, ge=0)
    # A connection must finish the HTTP/2 handshake (client preface) within this time.
    handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    # The server pings idle connections every keepalive_time and drops them if no answer
    # comes within keepalive_timeout; clients may ping no more often than
    # keepalive_min_client_ping_interval (more often: GOAWAY "too_many_pings").
    keepalive_time_seconds: float = Field(default=60.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=20.0, gt=0)
    keepalive_min_client_ping_interval_seconds: float = Field(default=10.0, ge=0)
    keepalive_max_ping_strikes: int = Field(default=2, ge=0)
    # The longest a unary call may run when its caller set no deadline (0: no bound). It
    # bounds the database work as a caller's deadline does: a call without one must not wait
    # for as long as a hung database does.
    default_call_timeout_seconds: float = Field(default=60.0, ge=0)
    # How often readiness (health of the service names) re-checks the database and schema.
    readiness_interval_seconds: float = Field(default=2.0, gt=0, le=60)
    # Password hashing (Argon2id); lower bounds follow OWASP.
    argon2_time_cost: int = Field(default=2, ge=2)
    argon2_memory_kib: int = Field(default=19456, ge=19456)
    argon2_parallelism: int = Field(default=1, ge=1)
    # Hashes computed at once (0: one per usable core), in threads of lower priority than the
    # event loop; up to hash_queue_limit more wait, beyond that RESOURCE_EXHAUSTED + RetryInfo.
    hash_concurrency: int = Field(default=0, ge=0)
    hash_queue_limit: int = Field(default=64, ge=0)
    reflection: bool = True

    # Tokens. The signing key is a PEM EC P-256 private key; verification keys (comma-separated
    # PEM files, public or private) stay valid for tokens signed before a key rotation.
    # Empty signing key in development: one is generated into data_dir. Required in production.
    jwt_signing_key_file: Path | None = None
    jwt_verification_key_files: str = ""
    jwt_issuer: str = "usersvc"
    jwt_audience: str = "usersvc"
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=30)
    access_token_ttl_seconds: int = Field(default=900, ge=30)
    refresh_token_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    # How long a user's token version and state are cached: revocation takes effect within it.
    token_cache_seconds: float = Field(default=2.0, ge=0, le=5)
    # Login hardening: consecutive failures before a lock, and how long the lock lasts.
    login_max_failures: int = Field(default=10, ge=1)
    login_lock_seconds: int = Field(default=900, ge=1)
    # Disable active users (service accounts aside) whose last login, or creation if they
    # never logged in, is older than this many days; checked hourly. 0: off.
    dormant_disable_days: int = Field(default=0, ge=0, le=36500)
    # Longest lifetime `usersvc issue-service-token --ttl` may give: verifiers that check
    # tokens offline cannot see a revocation before the token's exp.
    service_token_max_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    # Rate limits per replica, in the `limits` notation ("100/second; 2000/minute"; empty: off).
    # Reads and writes count per caller (the token's subject); login per peer address, and
    # per e-mail address and peer together, so that one source guesses one account slowly.
    rate_limit_reads: str = "2000/second"
    rate_limit_writes: str = "200/second"
    rate_limit_login_per_peer: str = "100/second"
    rate_limit_login_per_email: str = "10/minute"
    # How long CreateUser remembers a request_id (AIP-155), then the key is purged.
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    # WatchUserEvents: events older than this are purged; a resume token older than it gives
    # FAILED_PRECONDITION (RESUME_TOKEN_EXPIRED).
    user_events_retention_seconds: int = Field(default=7 * 24 * 3600, ge=3600)
    # How often the purge runs.
    user_events_purge_interval_seconds: float = Field(default=3600.0, gt=0)
    # A watcher reads the events table at least this often, whatever wake-ups it got
    # (PostgreSQL NOTIFY and commits in this process wake it at once).
    watch_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # A quiet stream gets a checkpoint (a fresh resume token) this often.
    watch_checkpoint_seconds: float = Field(default=30.0, gt=0)
    # A stream whose message gRPC could send only after this long ends (RESOURCE_EXHAUSTED).
    watch_slow_consumer_seconds: float = Field(default=30.0, gt=0)
    # Mailed one-time codes: how long an e-mail verification code and a password recovery code
    # (CreateRecoveryCode) work, and how many wrong
    # codes burn a user's outstanding one (it must then be sent again).
    email_verification_code_ttl_seconds: int = Field(default=24 * 3600, ge=60, le=30 * 24 * 3600)
    recovery_code_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    one_time_code_max_attempts: int = Field(default=5, ge=1, le=100)
    # Days a soft-deleted user can be undeleted before the purge job removes it for good.
    deleted_user_retention_days: int = Field(default=30, ge=1, le=3650)
    # How often the purge job looks for deleted users past their purge time.
    deleted_user_purge_interval_seconds: float = Field(default=3600.0, gt=0)

    # Welcome e-mail through the outbox. Empty smtp_host: the dispatcher is off.
    smtp_host: str = ""
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_sender: str = "usersvc <no-reply@localhost>"
    smtp_timeout_seconds: float = Field(default=10.0, gt=0)
    # Dispatcher: polling, batching, leases and retries with exponential backoff and jitter.
    outbox_poll_seconds: float = Field(default=1.0, gt=0)
    outbox_batch_size: int = Field(default=20, ge=1)
    outbox_lease_seconds: float = Field(default=60.0, gt=0)
    outbox_max_attempts: int = Field(default=8, ge=1)
    outbox_backoff_base_seconds: float = Field(default=2.0, gt=0)
    outbox_backoff_max_seconds: float = Field(default=900.0, gt=0)

    # Prometheus /metrics over HTTP on its own host:port. Empty: no endpoint.
    metrics_address: str = ""
    # Server TLS (PEM files; the certificate file may hold the chain). Both empty: plaintext.
    # Files are read again when they change, checked at each new connection's handshake.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Mutual TLS: every client must present a certificate signed by this CA bundle; a client
    # without one is refused at the handshake.
    tls_client_ca_file: Path | None = None

    @field_validator("listen_address")
    @classmethod
    def _listen_address_is_host_port(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator(
        "rate_limit_reads",
        "rate_limit_writes",
        "rate_limit_login_per_peer",
        "rate_limit_login_per_email",
    )
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a rate limit such as '100/second' or '10/minute; 100/hour'"
                ) from None
        return value.strip()

    @field_validator("database_url")
    @classmethod
    def _database_url_is_supported(cls, value: str) -> str:
        if not value:
            return value
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL (postgresql+psycopg://user@host:5432/db or "
                "sqlite+aiosqlite:///path)"
            ) from None
        if url.drivername not in DRIVERS:
            raise ValueError(
                f"unsupported database {url.drivername!r}: use postgresql+psycopg:// or "
                "sqlite+aiosqlite://"
            )
        return url.set(drivername=DRIVERS[url.drivername]).render_as_string(hide_password=False)

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        problems = production_problems(
            {name: getattr(self, name) for name in type(self).model_fields}
        )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _outbox_lease_outlasts_a_send(self) -> Settings:
        # Otherwise no send could ever start with its lease safely ahead of it, and a second
        # dispatcher could claim the message while the first is still sending it.
        if self.outbox_lease_seconds <= self.smtp_timeout_seconds:
            raise ValueError(
                f"USERSVC_OUTBOX_LEASE_SECONDS ({self.outbox_lease_seconds}) must be longer than "
                f"USERSVC_SMTP_TIMEOUT_SECONDS ({self.smtp_timeout_seconds})"
            )
        return self

    @model_validator(mode="after")
    def _observability_and_tls_are_consistent(self) -> Settings:
        if self.metrics_address:
            host, sep, port = self.metrics_address.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError("USERSVC_METRICS_ADDRESS must be host:port, e.g. 0.0.0.0:9090")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("USERSVC_TLS_CERT_FILE and USERSVC_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("USERSVC_TLS_CLIENT_CA_FILE needs USERSVC_TLS_CERT_FILE and _KEY_FILE")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def verification_key_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.jwt_verification_key_files.split(",") if p.strip()]

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'usersvc.sqlite3'}"
