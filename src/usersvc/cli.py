"""The `usersvc` command: serve, migrate."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from usersvc.config import Settings
from usersvc.logs import configure_logging

log = logging.getLogger("usersvc")


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as err:
        print(f"usersvc: invalid settings:\n{err}", file=sys.stderr)
        raise SystemExit(2) from err


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    if args.migrate:
        from usersvc.migrate import upgrade

        upgrade(settings.effective_database_url)
    from usersvc.server import serve

    asyncio.run(serve(settings))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level)
    from usersvc.migrate import upgrade

    upgrade(settings.effective_database_url, args.revision)
    log.info("migrated", extra={"revision": args.revision})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usersvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--migrate", action="store_true", help="apply migrations first")
    serve.set_defaults(func=cmd_serve)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
