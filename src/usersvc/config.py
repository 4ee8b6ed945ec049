"""One typed settings object, read from USERSVC_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".data")


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
    # Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Seconds health reports NOT_SERVING before the listener closes, so that load balancers
    # and probes stop sending new calls first.
    shutdown_drain_seconds: float = Field(default=0.0, ge=0)
    # Secret that authenticates and encrypts page tokens. Empty in development: generated
    # once into data_dir. Required in production.
    secret_key: SecretStr = SecretStr("")
    db_pool_size: int = Field(default=10, ge=1)
    # Password hashing (Argon2id); lower bounds follow OWASP.
    argon2_time_cost: int = Field(default=2, ge=2)
    argon2_memory_kib: int = Field(default=19456, ge=19456)
    argon2_parallelism: int = Field(default=1, ge=1)
    # Hashes computed at once; the rest wait, so logins cannot starve the CPU.
    hash_concurrency: int = Field(default=4, ge=1)
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
    # How long CreateUser remembers a request_id (AIP-155), then the key is purged.
    idempotency_ttl_seconds: int = Field(default=24 * 3600, ge=60)

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

    @model_validator(mode="after")
    def _production_needs_real_secrets(self) -> Settings:
        if self.environment == "production":
            secret = self.secret_key.get_secret_value()
            # Length and variety: refuses placeholders such as "changeme" or 32 times "k".
            if len(secret) < 32 or len(set(secret)) < 12:
                raise ValueError(
                    "USERSVC_SECRET_KEY must be set to at least 32 random characters in production"
                )
            if not self.database_url:
                raise ValueError("USERSVC_DATABASE_URL must be set in production")
            if self.jwt_signing_key_file is None:
                raise ValueError("USERSVC_JWT_SIGNING_KEY_FILE must be set in production")
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

    @property
    def verification_key_paths(self) -> list[Path]:
        return [Path(p.strip()) for p in self.jwt_verification_key_files.split(",") if p.strip()]

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'usersvc.sqlite3'}"
