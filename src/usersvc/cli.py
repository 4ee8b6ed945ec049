"""The `usersvc` command: serve, migrate, dispatch, create-admin, issue-service-token,
healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from usersvc.config import ENV_PREFIX, Settings, settings_problems
from usersvc.logs import configure_logging

log = logging.getLogger("usersvc")
T = TypeVar("T")

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in "90", "90s", "15m", "24h" or "7d"."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 3600s, 15m, 24h, 7d)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _fail(message: str, code: int = 2) -> SystemExit:
    print(f"usersvc: {message}", file=sys.stderr)
    return SystemExit(code)


def _settings() -> Settings:
    """The settings, or exit 2 with one line per problem, each naming its variable."""
    try:
        return Settings()
    except ValidationError as err:
        for line in settings_problems(err):
            print(f"usersvc: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def _log_where(settings: Settings, command: str) -> None:
    """Which data directory and database a command works on, as absolute as they get."""
    from usersvc.adapters.schema_check import describe_url

    log.info(
        command,
        extra={
            "data_dir": str(Path(settings.data_dir).resolve()),
            "database": describe_url(settings.effective_database_url),
        },
    )


def _upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate, or exit 1 with one line saying why not."""
    from sqlalchemy.exc import DBAPIError

    from usersvc.adapters.schema_check import describe_url
    from usersvc.migrate import upgrade

    try:
        upgrade(settings.effective_database_url, revision)
    except (DBAPIError, OSError) as err:
        cause = " ".join(str(getattr(err, "orig", None) or err).split())
        where = describe_url(settings.effective_database_url)
        raise _fail(f"cannot migrate {where}: {cause}", 1) from None


def _with_components(settings: Settings, task: Callable[..., Awaitable[T]], **kwargs: object) -> T:
    """Build the components on a migrated database, run one task, close them.

    An unmigrated (or unreachable) database is refused before anything is created, not
    migrated silently: a typo in USERSVC_DATABASE_URL or USERSVC_DATA_DIR must not make a new,
    empty service with keys of its own.
    """
    from sqlalchemy.engine import make_url

    from usersvc.adapters.db import create_engine
    from usersvc.adapters.schema_check import check_schema, describe_url
    from usersvc.migrate import script_revisions

    url = settings.effective_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).resolve()
        if not path.exists():
            raise _fail(f"database {describe_url(url)} does not exist: run usersvc migrate")

    async def run() -> T:
        from usersvc.bootstrap import build_components
        from usersvc.context import request_id_var

        heads, known = script_revisions()
        engine = create_engine(url, pool_size=1)
        try:
            state = await check_schema(engine, heads=heads, known=known, within=10)
        finally:
            await engine.dispose()
        if state.problem is not None:
            raise _fail(state.problem)
        # Operator actions get a request id of their own in the audit trail.
        request_id_var.set(f"cli-{uuid.uuid4()}")
        components = build_components(settings)
        try:
            return await task(components, **kwargs)
        finally:
            await components.close()

    return asyncio.run(run())


def _read_password() -> str:
    """From a prompt (twice) on a terminal, else one line of standard input; never argv."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password again: "):
            raise SystemExit("usersvc: the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    _log_where(settings, "serve")
    if args.migrate:
        _upgrade(settings)
    try:
        if settings.workers > 1:
            from usersvc.workers import serve_workers

            return serve_workers(settings)
        from usersvc import event_loop
        from usersvc.server import serve

        event_loop.run(serve(settings), settings.event_loop)
    except OSError as err:  # the listen address cannot be bound
        raise _fail(f"{ENV_PREFIX}LISTEN_ADDRESS: {err}") from None
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    _log_where(settings, "migrate")
    _upgrade(settings, args.revision)
    log.info("migrated", extra={"revision": args.revision})
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    _log_where(settings, "dispatch")
    from usersvc.jobs import dispatch_until_signalled

    return asyncio.run(dispatch_until_signalled(settings))


def cmd_create_admin(args: argparse.Namespace) -> int:
    from usersvc.domain.errors import DomainError
    from usersvc.operator_tasks import create_admin

    settings = _settings()
    configure_logging(settings.log_level)
    _log_where(settings, "create-admin")
    try:
        password = _read_password()
        result = _with_components(
            settings, create_admin, email=args.email, name=args.name, password=password
        )
    except DomainError as err:
        details = "; ".join(f"{v.field}: {v.description}" for v in getattr(err, "violations", []))
        print(f"usersvc: {err.message}{': ' + details if details else ''}", file=sys.stderr)
        return 1
    if result.already_admin:
        print(f"{result.user.email} is already an admin (id {result.user.id}); nothing changed")
    else:
        verb = "created" if result.created else "promoted"
        print(f"{verb} admin {result.user.email} (id {result.user.id})")
    return 0


def cmd_issue_service_token(args: argparse.Namespace) -> int:
    from usersvc.domain.errors import DomainError
    from usersvc.operator_tasks import issue_service_token

    settings = _settings()
    configure_logging(settings.log_level)
    _log_where(settings, "issue-service-token")
    if args.ttl > settings.service_token_max_ttl_seconds:
        raise _fail(
            f"--ttl {args.ttl} s is longer than {ENV_PREFIX}SERVICE_TOKEN_MAX_TTL_SECONDS "
            f"({settings.service_token_max_ttl_seconds} s)"
        )
    try:
        token = _with_components(
            settings, issue_service_token, subject=args.subject, ttl_seconds=args.ttl
        )
    except DomainError as err:
        print(f"usersvc: {err.message}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _version() -> str:
    try:
        return version("usersvc")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _settings_epilog() -> str:
    names = ", ".join(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
    return (
        "Settings are environment variables; README.md (section Settings) gives each one's "
        f"default and meaning: {names}."
    )


def _probe_target(listen_address: str) -> str:
    """Where a probe inside the pod or container reaches a server listening on `address`."""
    host, _, port = listen_address.rpartition(":")
    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard is reached on loopback
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Health/Check as a kubelet calls it: 0 when SERVING, 1 otherwise (reason on stderr)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        settings = Settings()
    except ValidationError as err:
        print(f"usersvc healthcheck: invalid settings:\n{err}", file=sys.stderr)
        return 1
    address = args.address or _probe_target(settings.listen_address)
    use_tls = settings.tls_enabled if args.tls is None else args.tls
    options: list[tuple[str, str]] = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    try:
        if use_tls:

            def read(path: str | None) -> bytes | None:
                return Path(path).read_bytes() if path else None

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(args.ca_file),
                private_key=read(args.key_file),
                certificate_chain=read(args.cert_file),
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
    except OSError as err:
        print(f"usersvc healthcheck: {err}", file=sys.stderr)
        return 1
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            print(f"usersvc healthcheck: {address}: {name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"usersvc healthcheck: {address}: {status}", file=sys.stderr)
        return 1
    if args.verbose:
        print(f"{address} {args.service or '(server)'}: {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usersvc", description=__doc__, epilog=_settings_epilog())
    parser.add_argument("--version", action="version", version=f"usersvc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.set_defaults(func=cmd_serve)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(func=cmd_migrate)
    dispatch = sub.add_parser(
        "dispatch", help="deliver welcome e-mails from the outbox, without the gRPC server"
    )
    dispatch.set_defaults(func=cmd_dispatch)
    admin = sub.add_parser(
        "create-admin",
        help="create the first admin, or promote an existing user (password from a prompt "
        "or standard input)",
    )
    admin.add_argument("--email", required=True)
    admin.add_argument("--name", required=True)
    admin.set_defaults(func=cmd_create_admin)
    token = sub.add_parser(
        "issue-service-token", help="print a service-role access token for another backend"
    )
    token.add_argument("--subject", required=True, help="service name, e.g. billing")
    token.add_argument("--ttl", type=parse_duration, default=24 * 3600, help="e.g. 24h, 7d")
    token.set_defaults(func=cmd_issue_service_token)
    check = sub.add_parser(
        "healthcheck",
        help="call grpc.health.v1.Health/Check like a kubelet probe; exit 0 when SERVING, else 1",
    )
    check.add_argument(
        "--address", help="host:port (default: USERSVC_LISTEN_ADDRESS, 0.0.0.0 as 127.0.0.1)"
    )
    check.add_argument(
        "--service",
        default="",
        help='service name to ask about; "" (default) is the whole server, '
        '"userservice.v1.UserService" is readiness to serve calls',
    )
    check.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    check.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="call over TLS (default: when USERSVC_TLS_CERT_FILE is set)",
    )
    check.add_argument("--ca-file", help="PEM CA bundle that signed the server's certificate")
    check.add_argument("--cert-file", help="client certificate (PEM), for mutual TLS")
    check.add_argument("--key-file", help="client key (PEM), for mutual TLS")
    check.add_argument("--server-name", help="name to verify the server's certificate against")
    check.add_argument("-v", "--verbose", action="store_true", help="print the status on success")
    check.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
