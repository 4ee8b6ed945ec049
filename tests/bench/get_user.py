"""Benchmark: authenticated GetUser against a bare grpc.aio server, as a throughput ratio.

Both servers run in their own processes on this machine, one at a time, under the same load:
a client process keeping `--concurrency` calls in flight for `--seconds`. The bare server
answers GetUser with a constant user and has no interceptors; usersvc answers from its
database through every layer (request id, access log, errors, JWT auth, service, repository).

    python -m tests.bench.get_user [--seconds 10] [--concurrency 32] [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from tests.support import (
    TEST_SECRET,
    TEST_SIGNING_KEY,
    ensure_admin,
    make_settings,
    mint_token,
    postgres_server,
    throwaway_database,
    throwaway_sqlite,
)
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1 import user_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _bare_handler() -> grpc.GenericRpcHandler:
    """The floor: GetUser with no interceptors and no database, answering a constant user."""
    response = pb.GetUserResponse(
        user=user_pb2.User(
            id=str(uuid.uuid4()),
            email="bench@example.com",
            name="Bench",
            state=user_pb2.USER_STATE_ACTIVE,
            etag='"1"',
        )
    )

    async def get_user(request: pb.GetUserRequest, context: object) -> pb.GetUserResponse:
        return response

    return grpc.method_handlers_generic_handler(
        "userservice.v1.UserService",
        {
            "GetUser": grpc.unary_unary_rpc_method_handler(
                get_user,
                request_deserializer=pb.GetUserRequest.FromString,
                response_serializer=pb.GetUserResponse.SerializeToString,
            )
        },
    )


async def _serve_bare(address: str = "127.0.0.1:0", *, reuse_port: bool = False) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    server.add_generic_rpc_handlers((_bare_handler(),))
    port = server.add_insecure_port(address)
    await server.start()
    # One write per line: the processes of a multi-process bare server share the file.
    line = json.dumps({"message": "serving", "address": f"127.0.0.1:{port}", "pid": os.getpid()})
    os.write(sys.stdout.fileno(), (line + "\n").encode())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def _serve_bare_processes(processes: int) -> int:
    """`processes` bare servers on one port (SO_REUSEPORT), forked before any gRPC object,
    as usersvc's workers are."""
    if processes == 1:
        asyncio.run(_serve_bare())
        return 0
    import socket

    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{reserved.getsockname()[1]}"
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            reserved.close()
            asyncio.run(_serve_bare(address, reuse_port=True))
            os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    for _ in children:
        os.wait()
    return 0


async def _load(address: str, user_id: str, token: str, seconds: float, concurrency: int) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.GetUserRequest(id=user_id)
    ok = errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.UserServiceStub(channel)
        await stub.GetUser(request, metadata=metadata)  # warm-up; fails loudly if misconfigured
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                try:
                    await stub.GetUser(request, metadata=metadata)
                    ok += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    print(json.dumps({"ok": ok, "errors": errors, "rps": ok / elapsed}), flush=True)


def _start(
    cmd: list[str], env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen[str], str]:
    # Output goes to a file: a pipe nobody reads would fill up and stall the server's logging.
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "serving":
                return proc, str(entry["address"])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {cmd}\n{log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _measure(address: str, user_id: str, token: str, args: argparse.Namespace) -> float:
    if args.load == "h2load":
        return _measure_h2load(address, user_id, token, args)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.get_user",
            "--client",
            address,
            user_id,
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
        raise RuntimeError(f"{result['errors']} calls failed against {address}")
    return float(result["rps"])


def _measure_h2load(address: str, user_id: str, token: str, args: argparse.Namespace) -> float:
    """h2load (nghttp2) as the load generator: a C client that leaves the CPU to the server.

    It cannot read gRPC trailers, so correctness is checked separately (see _run).
    """
    body = pb.GetUserRequest(id=user_id).SerializeToString()
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
                f"http://{address}/userservice.v1.UserService/GetUser",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(body_path)
    for line in out.stdout.splitlines():
        if line.startswith("finished in"):
            # "finished in 5.00s, 1234.56 req/s, ..."
            return float(line.split(",")[1].split()[0])
    raise RuntimeError(f"unexpected h2load output:\n{out.stdout}")


def _run(database_url: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(database_url, data_dir)
        ensure_admin(settings)
        env = {
            **os.environ,
            "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0",
            "USERSVC_DATABASE_URL": database_url,
            "USERSVC_DATA_DIR": data_dir,
            "USERSVC_SECRET_KEY": TEST_SECRET,
            "USERSVC_JWT_SIGNING_KEY_FILE": str(TEST_SIGNING_KEY),
            "USERSVC_LOG_LEVEL": "INFO",
            "USERSVC_WORKERS": str(args.workers),
        }
        svc, svc_address = _start(
            [sys.executable, "-m", "usersvc", "serve"], env, Path(data_dir) / "usersvc.log"
        )
        try:
            admin_token = mint_token(_admin_id(database_url))
            user_id = _create_user(svc_address, admin_token)
            token = mint_token(user_id, roles=())  # a plain user reading itself
            usersvc_rps = _measure(svc_address, user_id, token, args)
        finally:
            _stop(svc)
        # h2load cannot read gRPC trailers: the access log says how every call ended.
        codes: dict[str, int] = {}
        for line in (Path(data_dir) / "usersvc.log").read_text().splitlines():
            if '"message": "rpc"' in line and "GetUser" in line:
                code = json.loads(line)["code"]
                codes[code] = codes.get(code, 0) + 1
        # CANCELLED: calls still in flight when the load generator's time ran out.
        if not codes.get("OK") or set(codes) - {"OK", "CANCELLED"}:
            raise RuntimeError(f"GetUser calls did not all succeed: {codes}")
        bare, bare_address = _start(
            [sys.executable, "-m", "tests.bench.get_user", "--bare"],
            env,
            Path(data_dir) / "bare.log",
        )
        try:
            bare_rps = _measure(bare_address, user_id, token, args)
        finally:
            _stop(bare)
    return {"bare_rps": bare_rps, "usersvc_rps": usersvc_rps, "ratio": usersvc_rps / bare_rps}


def _admin_id(database_url: str) -> str:
    from sqlalchemy import text

    from tests.support import sync_engine

    engine = sync_engine(database_url)
    try:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    text("SELECT id FROM users WHERE email = 'admin@example.com'")
                ).scalar_one()
            )
    finally:
        engine.dispose()


def _create_user(address: str, admin_token: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.UserServiceStub(channel)
        response = stub.CreateUser(
            pb.CreateUserRequest(
                email="bench-user@example.com", name="Bench User", password="bench user password 1"
            ),
            metadata=(("authorization", f"Bearer {admin_token}"),),
        )
        return str(response.user.id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--workers", type=int, default=1, help="usersvc server processes")
    parser.add_argument(
        "--load",
        choices=["h2load", "python"],
        default="h2load" if shutil.which("h2load") else "python",
        help="load generator (default: h2load when installed)",
    )
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--client", nargs=3, metavar=("ADDRESS", "USER_ID", "TOKEN"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare:
        return _serve_bare_processes(args.processes)
    if args.client:
        address, user_id, token = args.client
        asyncio.run(_load(address, user_id, token, args.seconds, args.concurrency))
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
    print(
        json.dumps(
            {
                "benchmark": "authenticated GetUser vs bare grpc.aio",
                "database": args.database,
                "seconds": args.seconds,
                "concurrency": args.concurrency,
                "load": args.load,
                "usersvc_workers": args.workers,
                **{k: round(v, 3) for k, v in result.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
