"""Test support: PostgreSQL discovery, throwaway databases, an in-process server thread."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Engine, make_url

from userservice.v1 import auth_service_pb2, auth_service_pb2_grpc
from usersvc.adapters.jwt_tokens import AccessTokenCodec, KeySet, generate_private_key_file
from usersvc.bootstrap import build_components
from usersvc.config import Settings
from usersvc.migrate import upgrade
from usersvc.operator_tasks import create_admin
from usersvc.server import RunningServer, build_server

TEST_SECRET = "test-secret-key-0123456789abcdef0123456789"
ADMIN_PASSWORD = "admin password for tests 1"
# One signing key for every test server of the session, so any of them accepts its tokens.
TEST_KEY_DIR = Path(tempfile.mkdtemp(prefix="usersvc-test-keys-"))
TEST_SIGNING_KEY = TEST_KEY_DIR / "signing.pem"
generate_private_key_file(TEST_SIGNING_KEY)


def _server_answers(url: str) -> bool:
    try:
        with psycopg.connect(_libpq(url), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str | None, str]]:
    """An admin URL of a PostgreSQL server to create test databases on, or (None, why not).

    Order: USERSVC_TEST_DATABASE_URL; the server on 127.0.0.1:5432; a throwaway cluster
    started from PostgreSQL binaries on this machine (pytest-postgresql's executor).
    """
    configured = os.environ.get("USERSVC_TEST_DATABASE_URL")
    if configured:
        yield configured, ""
        return
    local = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    if _server_answers(local):
        yield local, ""
        return
    pg_ctl = shutil.which("pg_ctl") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None
    )
    if pg_ctl is None:
        yield (
            None,
            "no PostgreSQL: USERSVC_TEST_DATABASE_URL unset, none on 127.0.0.1:5432, no pg_ctl",
        )
        return
    from pytest_postgresql.executors import PostgreSQLExecutor

    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        executor = PostgreSQLExecutor(
            executable=pg_ctl,
            host="127.0.0.1",
            port=port,
            datadir=f"{tmp}/data",
            unixsocketdir=tmp,
            logfile=f"{tmp}/pg.log",
            startparams="-w",
            dbname="postgres",
        )
        try:
            executor.start()
        except Exception as err:  # initdb refuses to run as root, among other things
            yield None, f"no PostgreSQL: starting a throwaway cluster failed: {err}"
            return
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", ""
        finally:
            executor.stop()


@contextlib.contextmanager
def throwaway_database(admin_url: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database (migrated unless told otherwise) on the server of `admin_url`, dropped
    afterwards."""
    name = f"usersvc_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        if migrated:
            upgrade(rendered)
        yield rendered
    finally:
        with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def throwaway_sqlite(*, migrated: bool = True) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/usersvc.sqlite3"
        if migrated:
            upgrade(url)
        yield url


def sync_engine(url: str) -> Engine:
    """A synchronous engine on the same database, for assertions on stored rows."""
    parsed = make_url(url)
    driver = "sqlite" if parsed.get_backend_name() == "sqlite" else "postgresql+psycopg"
    return create_sync_engine(parsed.set(drivername=driver))


def make_settings(database_url: str, data_dir: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen_address": "127.0.0.1:0",
        "database_url": database_url,
        "data_dir": data_dir,
        "secret_key": TEST_SECRET,
        "log_level": "INFO",
        "jwt_signing_key_file": str(TEST_SIGNING_KEY),
        "access_token_ttl_seconds": 3600,
        # Tests call much faster than any one production caller; the limiter still runs.
        "rate_limit_reads": "100000/second",
        "rate_limit_writes": "100000/second",
        "rate_limit_login_per_peer": "100000/second",
        "rate_limit_login_per_email": "100000/second",
    }
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """A real server on its own event loop in a thread, bound to a free port."""

    def __init__(self, settings: Settings, *, tracer_provider: Any = None) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.port = 0
        self.running: RunningServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._grace: float | None = 0
        self._thread = threading.Thread(target=self._run, name="usersvc-server", daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(timeout=60)
        if self._error is not None:
            raise self._error
        assert self.port, "server did not start"
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:
            self._error = err
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.running = await build_server(self.settings, tracer_provider=self.tracer_provider)
        await self.running.start()
        self.port = self.running.port
        self._ready.set()
        await self._stop.wait()
        await self.running.stop(self._grace, drain=self.settings.shutdown_drain_seconds)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float | None = 0) -> None:
        self._grace = grace
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ErrorDetails:
    """What a failed call carried, decoded from grpc-status-details-bin."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    request_id: str
    violations: dict[str, str]
    retry_delay_seconds: float | None
    trailers: dict[str, str]


def details_of(err: grpc.RpcError) -> ErrorDetails:
    assert isinstance(err, grpc.Call)
    status: status_pb2.Status | None = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    info = error_details_pb2.ErrorInfo()
    req = error_details_pb2.RequestInfo()
    bad = error_details_pb2.BadRequest()
    retry = error_details_pb2.RetryInfo()
    found: dict[str, bool] = {}
    for detail in status.details:
        assert isinstance(detail, any_pb2.Any)
        for name, msg in (("info", info), ("req", req), ("bad", bad), ("retry", retry)):
            if detail.Is(msg.DESCRIPTOR):
                detail.Unpack(msg)
                found[name] = True
    assert found.get("info"), "ErrorInfo missing"
    assert found.get("req"), "RequestInfo missing"
    return ErrorDetails(
        code=err.code(),
        message=status.message,
        reason=info.reason,
        domain=info.domain,
        request_id=req.request_id,
        violations={v.field: v.description for v in bad.field_violations},
        retry_delay_seconds=retry.retry_delay.ToNanoseconds() / 1e9 if found.get("retry") else None,
        trailers={k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)},
    )


def ensure_admin(settings: Settings, email: str = "admin@example.com") -> str:
    """Create (or promote) the admin `email` through the operator task; returns its id."""

    async def run() -> str:
        components = build_components(settings)
        try:
            result = await create_admin(
                components, email=email, name="Admin", password=ADMIN_PASSWORD
            )
            return str(result.user.id)
        finally:
            await components.close()

    return asyncio.run(run())


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self._token()}")]
        return continuation(details._replace(metadata=metadata), request)


def with_bearer(channel: grpc.Channel, token: str | Callable[[], str]) -> grpc.Channel:
    """A channel that sends `authorization: Bearer <token>` on every unary call."""
    get = token if callable(token) else (lambda: token)
    return grpc.intercept_channel(channel, _BearerInterceptor(get))


def login(channel: grpc.Channel, email: str, password: str) -> auth_service_pb2.TokenPair:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    response = stub.Login(auth_service_pb2.LoginRequest(email=email, password=password))
    return response.tokens


def mint_token(
    user_id: uuid.UUID | str, roles: tuple[str, ...] = ("admin",), version: int = 1
) -> str:
    """An access token signed with the test key, as any test server would issue it."""
    codec = AccessTokenCodec(
        KeySet.load(TEST_SIGNING_KEY, []),
        issuer="usersvc",
        audience="usersvc",
        ttl_seconds=600,
        leeway=30,
    )
    token, _ = codec.issue(subject=uuid.UUID(str(user_id)), roles=roles, version=version)
    return token


def bulk_insert_users(url: str, count: int, *, password_hash: str = "$argon2id$bulk") -> None:
    """`count` users on PostgreSQL through COPY, one second apart going back from 2020, then
    VACUUM ANALYZE, as a large production table would look to the planner."""
    start = datetime(2020, 1, 1, tzinfo=UTC)
    with psycopg.connect(_libpq(url)) as conn:
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY users (id, email, name, password_hash, roles, state, create_time,"
                " update_time, version) FROM STDIN"
            ) as copy,
        ):
            for i in range(count):
                created = start - timedelta(seconds=i)
                copy.write_row(
                    (
                        uuid.uuid4(),
                        f"bulk-{i}@example.com",
                        f"Bulk User {i}",
                        password_hash,
                        "[]",
                        "active",
                        created,
                        created,
                        1,
                    )
                )
        conn.commit()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE users")
