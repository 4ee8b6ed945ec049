"""Benchmark: BatchGetUsers of 100 ids against one GetUser, on the same server, same load.

One usersvc server process answers both, one after the other, under the same load: a client
keeping `--concurrency` calls in flight for `--seconds` (h2load when installed, else a Python
client process). The cost of a batch is the ratio of the two throughputs: how many GetUser
calls the server answers in the time it answers one BatchGetUsers. The target is at most 5
(one database read for the batch, not one per id); the run fails above it.

    python -m tests.bench.batch_get_users [--seconds 5] [--rounds 3] [--concurrency 32]
                                          [--ids 100] [--database sqlite|postgresql]

The measurements alternate (GetUser, BatchGetUsers, GetUser, ...) for `--rounds` rounds and the
median round's ratio counts, so that other load on the machine weighs on both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import grpc
from sqlalchemy import insert

from tests.bench.get_user import ROOT, _start, _stop
from tests.support import (
    TEST_SECRET,
    TEST_SIGNING_KEY,
    ensure_admin,
    make_settings,
    mint_token,
    postgres_server,
    sync_engine,
    throwaway_database,
    throwaway_sqlite,
)
from userservice.v1 import user_service_pb2 as pb
from usersvc.adapters.tables import users as users_table

MAX_COST = 5.0
SERVICE = "/userservice.v1.UserService/"


def _seed(database_url: str, count: int) -> list[str]:
    """`count` users to read, then the service account that reads them (last)."""
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "email": f"bench-batch-{n}@example.com",
            "name": f"Bench Batch {n}",
            "password_hash": "$argon2id$bench",
            "roles": ["service"] if n == count else [],
            "state": "active",
            "create_time": now,
            "update_time": now,
            "version": 1,
        }
        for n in range(count + 1)
    ]
    engine = sync_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(users_table), rows)
    finally:
        engine.dispose()
    return [str(r["id"]) for r in rows]


async def _load(
    address: str, method: str, body: bytes, token: str, seconds: float, concurrency: int
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    ok = errors = 0
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        # No serializers: bytes in, bytes out.
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SERVICE + method)
        await call(body, metadata=metadata)  # warm-up; fails loudly if misconfigured
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                try:
                    await call(body, metadata=metadata)
                    ok += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    print(json.dumps({"ok": ok, "errors": errors, "rps": ok / elapsed}), flush=True)


def _measure(address: str, method: str, body: bytes, token: str, args: argparse.Namespace) -> float:
    if args.load == "h2load":
        return _measure_h2load(address, method, body, token, args)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.batch_get_users",
            "--client",
            address,
            method,
            body.hex(),
            token,
            "--seconds",
            str(args.seconds),
            "--concurrency",
            str(args.concurrency),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} {method} calls failed")
    return float(result["rps"])


def _measure_h2load(
    address: str, method: str, body: bytes, token: str, args: argparse.Namespace
) -> float:
    """h2load cannot read gRPC trailers; the access log is checked afterwards instead."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(b"\x00" + len(body).to_bytes(4, "big") + body)  # one gRPC frame
        body_path = f.name
    try:
        out = subprocess.run(
            [
                "h2load",
                "-D",
                str(int(args.seconds)),
                "--warm-up-time",
                "1",
                "-c",
                "4",
                "-m",
                str(max(1, args.concurrency // 4)),
                "-d",
                body_path,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                f"authorization: Bearer {token}",
                f"http://{address}{SERVICE}{method}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(body_path)
    for line in out.stdout.splitlines():
        if line.startswith("finished in"):
            return float(line.split(",")[1].split()[0])
    raise RuntimeError(f"unexpected h2load output:\n{out.stdout}")


def _codes(log_path: Path, method: str) -> dict[str, int]:
    codes: dict[str, int] = {}
    for line in log_path.read_text().splitlines():
        if '"message": "rpc"' in line and f"/{method}" in line:
            code = json.loads(line)["code"]
            codes[code] = codes.get(code, 0) + 1
    return codes


def _run(database_url: str, args: argparse.Namespace) -> dict[str, float | list[float]]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir)
        ensure_admin(settings)
        *ids, reader = _seed(database_url, args.ids)
        env = {
            **os.environ,
            "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0",
            "USERSVC_DATABASE_URL": database_url,
            "USERSVC_DATA_DIR": data_dir,
            "USERSVC_SECRET_KEY": TEST_SECRET,
            "USERSVC_JWT_SIGNING_KEY_FILE": str(TEST_SIGNING_KEY),
            "USERSVC_LOG_LEVEL": "INFO",
            # The limiter stays on, but the bench's one caller would be throttled as one greedy
            # caller at the default read limit once GetUser passes it (as in tests.bench.run).
            "USERSVC_RATE_LIMIT_READS": "1000000/second",
        }
        log_path = Path(data_dir) / "usersvc.log"
        svc, address = _start([sys.executable, "-m", "usersvc", "serve"], env, log_path)
        # A backend reading users: the service role, for both calls.
        token = mint_token(reader, roles=("service",))
        get_body = pb.GetUserRequest(id=ids[0]).SerializeToString()
        batch_body = pb.BatchGetUsersRequest(ids=ids).SerializeToString()
        costs: list[tuple[float, float, float]] = []
        try:
            # Alternating rounds: a change in the machine's other load hits both sides alike.
            for _ in range(args.rounds):
                get_rps = _measure(address, "GetUser", get_body, token, args)
                batch_rps = _measure(address, "BatchGetUsers", batch_body, token, args)
                costs.append((get_rps / batch_rps, get_rps, batch_rps))
        finally:
            _stop(svc)
        for method in ("GetUser", "BatchGetUsers"):
            codes = _codes(log_path, method)
            # CANCELLED: calls still in flight when the load generator's time ran out.
            if not codes.get("OK") or set(codes) - {"OK", "CANCELLED"}:
                raise RuntimeError(f"{method} calls did not all succeed: {codes}")
    cost, get_rps, batch_rps = statistics.median_low(costs)
    return {
        "get_user_rps": get_rps,
        "batch_rps": batch_rps,
        "batch_cost": cost,
        "batch_cost_rounds": [round(c[0], 3) for c in costs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="GetUser/BatchGetUsers pairs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ids", type=int, default=100, help="ids per BatchGetUsers call")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument(
        "--load",
        choices=["h2load", "python"],
        default="h2load" if shutil.which("h2load") else "python",
        help="load generator (default: h2load when installed)",
    )
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        address, method, body, token = args.client
        asyncio.run(
            _load(address, method, bytes.fromhex(body), token, args.seconds, args.concurrency)
        )
        return 0
    if args.database == "sqlite":
        with throwaway_sqlite() as url:
            result = _run(url, args)
    else:
        with postgres_server() as (admin_url, why_not):
            if admin_url is None:
                print(f"no PostgreSQL: {why_not}", file=sys.stderr)
                return 1
            with throwaway_database(admin_url) as url:
                result = _run(url, args)
    cost = result["batch_cost"]
    verdict = isinstance(cost, float) and cost <= MAX_COST
    print(
        json.dumps(
            {
                "benchmark": f"BatchGetUsers({args.ids} ids) vs GetUser, same server",
                "database": args.database,
                "seconds": args.seconds,
                "concurrency": args.concurrency,
                "load": args.load,
                "rounds": args.rounds,
                **{k: v if isinstance(v, list) else round(v, 3) for k, v in result.items()},
                "max_batch_cost": MAX_COST,
                "ok": verdict,
            }
        )
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
