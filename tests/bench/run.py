"""`make bench`: usersvc's performance targets, each a ratio measured in one run.

Scenarios (every server is a real `usersvc serve` process with everything it ships switched
on; "bare" is a grpc.aio server without interceptors answering a constant GetUserResponse,
run with the same number of processes):

- getuser-<db>-<n>w: authenticated GetUser, SQLite and PostgreSQL, 1 and 2 workers, against a
  bare server with as many processes. Rounds alternate between the two servers so that the
  machine's noise hits both alike; the per-worker split (calls and CPU) and each worker's
  RSS after every round are recorded.
- hash-storm: GetUser's p99 at a fixed open-loop rate, idle and while 16 CreateUser + Login
  calls hash continuously.
- create-vs-ceiling: CreateUser throughput against the Argon2id hash ceiling of the configured
  parameters on all cores (plain argon2-cffi in one process per core).
- list-depth: ListUsers' first page and a page at 95% depth (keyset token) against GetUser,
  at --users users seeded in bulk on PostgreSQL.
- batch-get: BatchGetUsers against GetUser, once the contract has the method.
- import: --import-users users (100,000) with existing password hashes (Argon2id, bcrypt,
  passlib and Django PBKDF2-SHA256, in turn) through BatchCreateUsers on PostgreSQL, 1,000 per
  call with 4 calls in flight: users created per second (no target; reported).

h2load (a C load generator) drives GetUser and ListUsers; it cannot read gRPC trailers, so
every scenario checks the access log: any call that did not end OK fails the bench.

    python -m tests.bench.run [--smoke] [--users N] [--seconds S] [--out bench/results]
        [--only getuser,storm,create,list,batchget,import]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from tests.support import (
    TEST_SECRET,
    TEST_SIGNING_KEY,
    bulk_insert_users,
    ensure_admin,
    make_settings,
    mint_token,
    postgres_server,
    sync_engine,
    throwaway_database,
    throwaway_sqlite,
)
from userservice.v1 import auth_service_pb2, auth_service_pb2_grpc
from userservice.v1 import user_service_pb2 as pb
from userservice.v1 import user_service_pb2_grpc as pb_grpc
from usersvc.adapters.page_tokens import PageTokenCodec
from usersvc.config import Settings
from usersvc.domain.models import PageCursor

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "userservice.v1.UserService"
BENCH_PASSWORD = "bench user password 1"
# h2load's warm-up before each measurement (0 in the smoke run).
WARM_UP_SECONDS = 1

# The targets of the performance issue: (name, comparison, limit).
LIMITS = {
    "getuser_sqlite_ratio": 0.6,
    "getuser_postgresql_ratio": 0.45,
    "two_worker_ratio_drop": 0.10,
    "hash_storm_p99_ratio": 3.0,
    "create_vs_ceiling": 0.9,
    "list_first_vs_get": 3.0,
    "list_deep_vs_get": 3.0,
    "peak_rss_mb": 200.0,
    "rss_growth_mb": 3.0,
}


# --- processes ---------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    cmd: list[str]
    rss_rounds: list[dict[int, float]] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The serving processes: the workers if the server forked any, else itself."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return [self.proc.pid]
        children = [int(p) for p in text.split()]
        return children or [self.proc.pid]

    def memory(self) -> dict[int, tuple[float, float]]:
        """pid -> (current RSS, peak RSS) in MB."""
        found: dict[int, tuple[float, float]] = {}
        for pid in self.pids():
            fields: dict[str, float] = {}
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        fields[key] = int(value.split()[0]) / 1024
            if fields:
                found[pid] = (fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0))
        return found

    def cpu_seconds(self) -> dict[int, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        found: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                found[pid] = (int(stat[11]) + int(stat[12])) / ticks
        return found


def start_server(cmd: list[str], env: dict[str, str], log_path: Path) -> Server:
    # Output goes to a file: a pipe nobody reads would fill up and stall the server's logging.
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in _log_entries(log_path.read_text()):
            if entry.get("message") == "serving":
                server = Server(proc, str(entry["address"]), log_path, cmd)
                expected = int(env.get("USERSVC_WORKERS", "1")) if "usersvc" in cmd else 1
                if expected > 1:
                    _wait_for(partial(_all_serving, log_path, expected), f"{expected} workers")
                return server
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start: {cmd}\n{log_path.read_text()[-3000:]}")


def _log_entries(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of a log, also where two processes' lines ran into one another."""
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        at = line.find("{")
        while at != -1:
            try:
                entry, end = decoder.raw_decode(line, at)
            except ValueError:
                break
            if isinstance(entry, dict):
                yield entry
            at = line.find("{", end)


def _all_serving(log_path: Path, workers: int) -> bool:
    return log_path.read_text().count('"message": "serving"') >= workers


def _wait_for(ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def usersvc_env(database_url: str, data_dir: str, workers: int) -> dict[str, str]:
    """The environment of a benchmarked server: defaults for everything but what a bench
    must set (address, database, keys). Info-level access log, as shipped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    env.update(
        {
            "USERSVC_LISTEN_ADDRESS": "127.0.0.1:0",
            "USERSVC_DATABASE_URL": database_url,
            "USERSVC_DATA_DIR": data_dir,
            "USERSVC_SECRET_KEY": TEST_SECRET,
            "USERSVC_JWT_SIGNING_KEY_FILE": str(TEST_SIGNING_KEY),
            "USERSVC_LOG_LEVEL": "INFO",
            "USERSVC_WORKERS": str(workers),
            # The rate limiter stays on (its cost per call is part of what is measured), but
            # one bench client is not to be throttled as one greedy caller would be.
            "USERSVC_RATE_LIMIT_READS": "1000000/second",
        }
    )
    return env


USERSVC_CMD = [sys.executable, "-m", "usersvc", "serve"]


def bare_cmd(processes: int) -> list[str]:
    return [sys.executable, "-m", "tests.bench.get_user", "--bare", "--processes", str(processes)]


# --- load ---------------------------------------------------------------------------------


def grpc_frame(message: Any) -> bytes:
    body: bytes = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


@dataclass
class H2Result:
    rps: float
    mean_ms: float
    latencies_ms: list[float]
    command: str
    succeeded: int = 0


def _duration_ms(text: str) -> float:
    for suffix, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    raise ValueError(text)


def h2load(
    address: str,
    method: str,
    message: Any,
    token: str,
    *,
    seconds: float,
    connections: int,
    streams: int,
    rps_per_connection: int | None = None,
    record_latencies: bool = False,
    warm_up: float | None = None,
) -> H2Result:
    """One h2load run against `method`; throughput, mean latency and, if asked, every
    call's latency (from its per-request log)."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.bin"
        body_path.write_bytes(grpc_frame(message))
        log_path = Path(tmp) / "requests.tsv"
        cmd = [
            "h2load",
            "-D",
            str(max(1, round(seconds))),
            "--warm-up-time",
            str(WARM_UP_SECONDS if warm_up is None else warm_up),
            "-c",
            str(connections),
            "-m",
            str(streams),
            "-d",
            str(body_path),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            f"authorization: Bearer {token}",
        ]
        if rps_per_connection:
            cmd += ["--rps", str(rps_per_connection)]
        if record_latencies:
            cmd += ["--log-file", str(log_path)]
        cmd.append(f"http://{address}/{SERVICE}/{method}")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        latencies: list[float] = []
        if record_latencies:
            for line in log_path.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and parts[1] == "200":
                    latencies.append(int(parts[2]) / 1000)
    rps = mean_ms = None
    succeeded = 0
    for line in out.stdout.splitlines():
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        if line.startswith("time for request:"):
            mean_ms = _duration_ms(line.split()[5])
        if line.startswith("requests:"):
            if " 0 failed" not in line:
                raise RuntimeError(f"h2load saw failed requests:\n{out.stdout}")
            succeeded = int(line.split(",")[3].split()[0])
    if rps is None or mean_ms is None:
        raise RuntimeError(f"unexpected h2load output:\n{out.stdout}")
    shown = (
        " ".join(shlex.quote(c) for c in cmd)
        .replace(token, "$TOKEN")
        .replace(str(body_path), "body.bin")
        .replace(str(log_path), "requests.tsv")
    )
    return H2Result(
        rps=rps, mean_ms=mean_ms, latencies_ms=latencies, command=shown, succeeded=succeeded
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def access_codes(log_path: Path, method: str, *, since: int = 0) -> dict[str, int]:
    """Codes of `method`'s calls in the access log, from line `since` on."""
    codes: dict[str, int] = {}
    needle = f"/{SERVICE}/{method}"
    for line in log_path.read_text().splitlines()[since:]:
        if '"message": "rpc"' in line and needle in line:
            code = json.loads(line)["code"]
            codes[code] = codes.get(code, 0) + 1
    return codes


def calls_per_pid(log_path: Path, method: str, *, since: int = 0) -> dict[int, int]:
    """Calls of `method` per serving process, when the access log names the process."""
    found: dict[int, int] = {}
    needle = f"/{SERVICE}/{method}"
    for line in log_path.read_text().splitlines()[since:]:
        if '"message": "rpc"' in line and needle in line:
            pid = json.loads(line).get("pid")
            if pid is not None:
                found[int(pid)] = found.get(int(pid), 0) + 1
    return found


def require_all_ok(log_path: Path, method: str, *, since: int = 0) -> dict[str, int]:
    codes = access_codes(log_path, method, since=since)
    # CANCELLED: calls still in flight when the load generator's time ran out.
    if not codes.get("OK") or set(codes) - {"OK", "CANCELLED"}:
        raise RuntimeError(f"{method} calls did not all succeed: {codes}")
    return codes


def log_lines(log_path: Path) -> int:
    return len(log_path.read_text().splitlines())


# --- fixtures -----------------------------------------------------------------------------


@dataclass
class Database:
    kind: str
    url: str
    admin_id: str
    user_id: str
    user_email: str
    users: int


def _admin_id(database_url: str) -> str:
    from sqlalchemy import text

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


def prepare_database(kind: str, url: str, data_dir: str, seed_users: int) -> Database:
    """The admin, the benchmarked user, and (on PostgreSQL) `seed_users` more in bulk."""
    settings = make_settings(url, data_dir)
    ensure_admin(settings)
    admin_id = _admin_id(url)
    email = "bench-user@example.com"
    user_id = _insert_user(url, email)
    if seed_users and kind == "postgresql":
        seed_postgres(url, seed_users)
    return Database(kind, url, admin_id, user_id, email, seed_users if kind == "postgresql" else 2)


def _password_hash() -> str:
    from argon2 import PasswordHasher, Type

    s = Settings()
    return PasswordHasher(
        time_cost=s.argon2_time_cost,
        memory_cost=s.argon2_memory_kib,
        parallelism=s.argon2_parallelism,
        type=Type.ID,
    ).hash(BENCH_PASSWORD)


def _insert_user(url: str, email: str) -> str:
    from sqlalchemy import insert

    from usersvc.adapters.tables import users

    user_id = uuid.uuid4()
    now = dt.datetime.now(dt.UTC)
    engine = sync_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(users).values(
                    id=user_id,
                    email=email,
                    name="Bench User",
                    password_hash=_password_hash(),
                    roles=[],
                    state="active",
                    create_time=now,
                    update_time=now,
                    version=1,
                )
            )
    finally:
        engine.dispose()
    return str(user_id)


def seed_postgres(url: str, count: int) -> None:
    bulk_insert_users(url, count, password_hash=_password_hash())


@contextlib.contextmanager
def databases(kinds: list[str], seed_users: int) -> Iterator[dict[str, Database]]:
    found: dict[str, Database] = {}
    with contextlib.ExitStack() as stack:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory())
        if "sqlite" in kinds:
            url = stack.enter_context(throwaway_sqlite())
            found["sqlite"] = prepare_database("sqlite", url, data_dir, 0)
        if "postgresql" in kinds:
            admin_url, why_not = stack.enter_context(postgres_server())
            if admin_url is None:
                raise RuntimeError(why_not)
            url = stack.enter_context(throwaway_database(admin_url))
            found["postgresql"] = prepare_database("postgresql", url, data_dir, seed_users)
        yield found


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class Bench:
    seconds: float
    rounds: int
    concurrency: int
    connections: int
    commands: list[str] = field(default_factory=list)
    peak_rss: dict[str, float] = field(default_factory=dict)

    def note_memory(self, scenario: str, server: Server) -> dict[int, tuple[float, float]]:
        memory = server.memory()
        for pid, (_, peak) in memory.items():
            key = f"{scenario}:{pid}"
            self.peak_rss[key] = max(self.peak_rss.get(key, 0.0), peak)
        return memory


def _user_token(db: Database) -> str:
    return mint_token(db.user_id, roles=())  # a plain user reading itself


def scenario_get_user(bench: Bench, db: Database, workers: int) -> dict[str, Any]:
    name = f"getuser-{db.kind}-{workers}w"
    token = _user_token(db)
    request = pb.GetUserRequest(id=db.user_id)
    with tempfile.TemporaryDirectory() as data_dir:
        env = usersvc_env(db.url, data_dir, workers)
        svc = start_server(USERSVC_CMD, env, Path(data_dir) / "usersvc.log")
        bare = start_server(bare_cmd(workers), env, Path(data_dir) / "bare.log")
        usersvc_rps: list[float] = []
        bare_rps: list[float] = []
        rss_rounds: list[dict[str, float]] = []
        try:
            streams = max(1, bench.concurrency // bench.connections)
            # Warm-up: caches, prepared statements, JIT-free but allocator-warm.
            h2load(svc.address, "GetUser", request, token, seconds=1, connections=2, streams=2)
            since = log_lines(svc.log_path)
            cpu_before = svc.cpu_seconds()
            command = ""
            # Server CPU per call, beside throughput: far less sensitive to what else runs on
            # the machine (h2load starts measuring at once: the warm-up ran above).
            cpu_per_call: dict[str, list[float]] = {"usersvc": [], "bare": []}
            for _ in range(bench.rounds):
                for which, server, rps_list in (
                    ("usersvc", svc, usersvc_rps),
                    ("bare", bare, bare_rps),
                ):
                    before = sum(server.cpu_seconds().values())
                    result = h2load(
                        server.address,
                        "GetUser",
                        request,
                        token,
                        seconds=bench.seconds,
                        connections=bench.connections,
                        streams=streams,
                        warm_up=0,
                    )
                    used = sum(server.cpu_seconds().values()) - before
                    rps_list.append(result.rps)
                    cpu_per_call[which].append(used / max(1, result.succeeded) * 1e6)
                    if which == "usersvc":
                        command = result.command
                        memory = bench.note_memory(name, svc)
                        rss_rounds.append({str(p): round(m[0], 1) for p, m in memory.items()})
            cpu_after = svc.cpu_seconds()
        finally:
            stop_server(svc)
            stop_server(bare)
        codes = require_all_ok(svc.log_path, "GetUser", since=since)
        per_pid_calls = calls_per_pid(svc.log_path, "GetUser", since=since)
    bench.commands.append(f"{name}: usersvc serve (USERSVC_WORKERS={workers}); {command}")
    cpu = {str(pid): round(cpu_after[pid] - cpu_before.get(pid, 0.0), 2) for pid in cpu_after}
    total_cpu = sum(cpu.values()) or 1.0
    total_calls = sum(per_pid_calls.values()) or 1
    return {
        "scenario": name,
        "database": db.kind,
        "workers": workers,
        "usersvc_rps": [round(r, 1) for r in usersvc_rps],
        "bare_rps": [round(r, 1) for r in bare_rps],
        # Each round measures usersvc and then the bare server straight after: the median of
        # the rounds' ratios follows the machine's load swings least.
        "ratio": round(
            statistics.median(u / b for u, b in zip(usersvc_rps, bare_rps, strict=True)), 3
        ),
        "ratio_of_sums": round(sum(usersvc_rps) / sum(bare_rps), 3),
        "usersvc_cpu_us_per_call": round(statistics.median(cpu_per_call["usersvc"]), 1),
        "bare_cpu_us_per_call": round(statistics.median(cpu_per_call["bare"]), 1),
        "cpu_ratio": round(
            statistics.median(cpu_per_call["bare"]) / statistics.median(cpu_per_call["usersvc"]),
            3,
        ),
        "codes": codes,
        "per_worker": {
            pid: {
                "cpu_seconds": cpu[pid],
                "cpu_share": round(cpu[pid] / total_cpu, 3),
                "calls": per_pid_calls.get(int(pid)),
                "call_share": (
                    round(per_pid_calls[int(pid)] / total_calls, 3)
                    if int(pid) in per_pid_calls
                    else None
                ),
            }
            for pid in cpu
        },
        "rss_mb_after_each_round": rss_rounds,
    }


def _storm(
    address: str, admin_token: str, login_emails: list[str], stop_after: float
) -> dict[str, int]:
    """16 calls that hash, kept in flight: 8 CreateUser, 8 Login; counts by outcome.

    Logins rotate over many accounts: one account may log in only a few times a minute."""
    next_login = iter(login_emails * 1000)

    async def run() -> dict[str, int]:
        counts: dict[str, int] = {}
        deadline = time.monotonic() + stop_after
        metadata = (("authorization", f"Bearer {admin_token}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            users = pb_grpc.UserServiceStub(channel)
            auth = auth_service_pb2_grpc.AuthServiceStub(channel)

            async def creator() -> None:
                while time.monotonic() < deadline:
                    try:
                        await users.CreateUser(
                            pb.CreateUserRequest(
                                email=f"storm-{uuid.uuid4().hex}@example.com",
                                name="Storm",
                                password=BENCH_PASSWORD,
                            ),
                            metadata=metadata,
                        )
                        key = "create_ok"
                    except grpc.aio.AioRpcError as err:
                        key = f"create_{err.code().name}"
                    counts[key] = counts.get(key, 0) + 1

            async def logger_in() -> None:
                while time.monotonic() < deadline:
                    try:
                        await auth.Login(
                            auth_service_pb2.LoginRequest(
                                email=next(next_login), password=BENCH_PASSWORD
                            )
                        )
                        key = "login_ok"
                    except grpc.aio.AioRpcError as err:
                        key = f"login_{err.code().name}"
                    counts[key] = counts.get(key, 0) + 1

            await asyncio.gather(*(creator() for _ in range(8)), *(logger_in() for _ in range(8)))
        return counts

    return asyncio.run(run())


def scenario_hash_storm(bench: Bench, db: Database) -> dict[str, Any]:
    token = _user_token(db)
    admin_token = mint_token(db.admin_id)
    request = pb.GetUserRequest(id=db.user_id)
    # A fixed open-loop rate well below saturation, so p99 shows waiting, not queueing.
    connections, per_connection = 4, 50
    logins = [db.user_email] + [f"bulk-{i}@example.com" for i in range(min(db.users, 5000))]
    with tempfile.TemporaryDirectory() as data_dir:
        env = usersvc_env(db.url, data_dir, 1)
        svc = start_server(USERSVC_CMD, env, Path(data_dir) / "usersvc.log")
        try:
            since = log_lines(svc.log_path)

            def measure() -> H2Result:
                return h2load(
                    svc.address,
                    "GetUser",
                    request,
                    token,
                    seconds=bench.seconds,
                    connections=connections,
                    streams=1,
                    rps_per_connection=per_connection,
                    record_latencies=True,
                )

            # Idle and storm alternate, every round, so that load from elsewhere falls on both.
            idle_ms: list[float] = []
            storm_ms: list[float] = []
            storm_counts: dict[str, int] = {}
            for _ in range(bench.rounds):
                idle = measure()
                idle_ms += idle.latencies_ms
                with _in_background(
                    partial(_storm, svc.address, admin_token, logins, bench.seconds + 4)
                ) as storm:
                    time.sleep(1.5)  # every storm call is hashing
                    storm_ms += measure().latencies_ms
                for key, count in storm().items():
                    storm_counts[key] = storm_counts.get(key, 0) + count
            bench.note_memory("hash-storm", svc)
        finally:
            stop_server(svc)
        codes = require_all_ok(svc.log_path, "GetUser", since=since)
    idle_p99, busy_p99 = percentile(idle_ms, 0.99), percentile(storm_ms, 0.99)
    bench.commands.append(f"hash-storm: {idle.command} (idle, then during the storm)")
    return {
        "scenario": "hash-storm",
        "database": db.kind,
        "rate_rps": connections * per_connection,
        "rounds": bench.rounds,
        "idle_calls": len(idle_ms),
        "storm_calls_measured": len(storm_ms),
        "idle_p50_ms": round(percentile(idle_ms, 0.5), 3),
        "idle_p99_ms": round(idle_p99, 3),
        "storm_p50_ms": round(percentile(storm_ms, 0.5), 3),
        "storm_p99_ms": round(busy_p99, 3),
        "ratio": round(busy_p99 / idle_p99, 2),
        "storm_calls": storm_counts,
        "codes": codes,
    }


@contextlib.contextmanager
def _in_background(work: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """Run `work` in a thread; the yielded function waits for and returns its result."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        yield future.result


def _hash_loop(seconds: float, out: Any) -> None:
    from argon2 import PasswordHasher, Type

    s = Settings()
    hasher = PasswordHasher(
        time_cost=s.argon2_time_cost,
        memory_cost=s.argon2_memory_kib,
        parallelism=s.argon2_parallelism,
        type=Type.ID,
    )
    hasher.hash(BENCH_PASSWORD)  # warm-up
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        hasher.hash(BENCH_PASSWORD)
        done += 1
    out.put(done / (time.perf_counter() - started))


def hash_ceiling(seconds: float) -> tuple[float, int]:
    """Argon2id hashes per second of the configured parameters, one process per core."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hash_loop, args=(seconds, out)) for _ in range(cores)]
    for p in procs:
        p.start()
    # Each process's own rate over its own window: their start-ups are not hashing time.
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    return total, cores


def _create_many(address: str, admin_token: str, seconds: float, in_flight: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        done = failed = 0
        metadata = (("authorization", f"Bearer {admin_token}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.UserServiceStub(channel)
            deadline = time.perf_counter() + seconds

            async def creator() -> None:
                nonlocal done, failed
                while time.perf_counter() < deadline:
                    try:
                        await stub.CreateUser(
                            pb.CreateUserRequest(
                                email=f"create-{uuid.uuid4().hex}@example.com",
                                name="Create",
                                password=BENCH_PASSWORD,
                            ),
                            metadata=metadata,
                        )
                        done += 1
                    except grpc.aio.AioRpcError:
                        failed += 1

            started = time.perf_counter()
            await asyncio.gather(*(creator() for _ in range(in_flight)))
            elapsed = time.perf_counter() - started
        return {"created": done, "failed": failed, "seconds": elapsed}

    return asyncio.run(run())


def scenario_create_vs_ceiling(bench: Bench, db: Database) -> dict[str, Any]:
    admin_token = mint_token(db.admin_id)
    seconds = max(bench.seconds, 1.0 if bench.rounds == 1 else 5.0)
    ceilings: list[float] = []
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as data_dir:
        env = usersvc_env(db.url, data_dir, 1)
        svc = start_server(USERSVC_CMD, env, Path(data_dir) / "usersvc.log")
        try:
            _create_many(svc.address, admin_token, 1.0, 16)  # warm-up
            # Ceiling and CreateUser alternate, so that load from elsewhere falls on both.
            for _ in range(bench.rounds):
                ceiling, cores = hash_ceiling(seconds)
                ceilings.append(ceiling)
                result = _create_many(svc.address, admin_token, seconds, 16)
                if result["failed"]:
                    raise RuntimeError(f"CreateUser calls failed: {result}")
                rates.append(result["created"] / result["seconds"])
            bench.note_memory("create-vs-ceiling", svc)
        finally:
            stop_server(svc)
    rate, ceiling = statistics.mean(rates), statistics.mean(ceilings)
    bench.commands.append(
        f"create-vs-ceiling: 16 CreateUser in flight for {seconds}s (grpc.aio client);"
        f" ceiling: argon2-cffi hash() in {cores} processes for {seconds}s"
    )
    return {
        "scenario": "create-vs-ceiling",
        "database": db.kind,
        "creates_per_second": round(rate, 1),
        "hash_ceiling_per_second": round(ceiling, 1),
        "creates_per_round": [round(r, 1) for r in rates],
        "ceiling_per_round": [round(c, 1) for c in ceilings],
        "cores": cores,
        "ratio": round(rate / ceiling, 3),
    }


def scenario_list_depth(bench: Bench, db: Database) -> dict[str, Any]:
    admin_token = mint_token(db.admin_id)
    deep = _cursor_at(db.url, 0.95)
    token = PageTokenCodec(TEST_SECRET.encode()).encode(deep, query="email=")
    get = pb.GetUserRequest(id=db.user_id)
    # A page of 1 (as the issue measured it: the page's cost without its mapping) and the
    # default page of 50.
    calls: list[tuple[str, str, Any]] = [("get", "GetUser", get)]
    for size in (1, 50):
        calls.append((f"first{size}", "ListUsers", pb.ListUsersRequest(page_size=size)))
        calls.append(
            (f"deep{size}", "ListUsers", pb.ListUsersRequest(page_size=size, page_token=token))
        )
    results: dict[str, list[float]] = {key: [] for key, _, _ in calls}
    seconds = max(1.0, bench.seconds / 2)
    with tempfile.TemporaryDirectory() as data_dir:
        env = usersvc_env(db.url, data_dir, 1)
        svc = start_server(USERSVC_CMD, env, Path(data_dir) / "usersvc.log")
        try:
            for _, method, message in calls:  # warm-up: every statement prepared
                h2load(svc.address, method, message, admin_token, seconds=1, connections=1,
                       streams=1, warm_up=0)  # fmt: skip
            since = log_lines(svc.log_path)
            command = ""
            for _ in range(bench.rounds):
                for key, method, message in calls:
                    result = h2load(
                        svc.address,
                        method,
                        message,
                        admin_token,
                        seconds=seconds,
                        connections=1,
                        streams=1,
                    )
                    results[key].append(result.mean_ms)
                    command = result.command
            bench.note_memory("list-depth", svc)
        finally:
            stop_server(svc)
        require_all_ok(svc.log_path, "ListUsers", since=since)
        require_all_ok(svc.log_path, "GetUser", since=since)
    bench.commands.append(f"list-depth: {command} (and GetUser, pages of 1 and 50, first and deep)")
    ms = {key: statistics.median(values) for key, values in results.items()}
    found: dict[str, Any] = {
        "scenario": "list-depth",
        "database": db.kind,
        "users": db.users,
        "get_ms": round(ms["get"], 3),
    }
    for size in (1, 50):
        found[f"first_page_{size}_ms"] = round(ms[f"first{size}"], 3)
        found[f"deep_page_{size}_ms"] = round(ms[f"deep{size}"], 3)
        found[f"first_{size}_vs_get"] = round(ms[f"first{size}"] / ms["get"], 2)
        found[f"deep_{size}_vs_get"] = round(ms[f"deep{size}"] / ms["get"], 2)
    return found


def _cursor_at(url: str, depth: float) -> PageCursor:
    """The list position `depth` of the way through the users, newest first."""
    from sqlalchemy import func, select

    from usersvc.adapters.tables import users

    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(users)).scalar_one()
            row = conn.execute(
                select(users.c.create_time, users.c.id)
                .order_by(users.c.create_time.desc(), users.c.id.desc())
                .offset(int(total * depth))
                .limit(1)
            ).one()
    finally:
        engine.dispose()
    return PageCursor(create_time=row.create_time, id=row.id)


def scenario_batch_get(bench: Bench, db: Database) -> dict[str, Any] | None:
    """BatchGetUsers of 100 ids against GetUser on one server: tests.bench.batch_get_users
    (its own seeded database of the same kind), with this run's seconds and rounds."""
    service = pb.DESCRIPTOR.services_by_name["UserService"]
    if "BatchGetUsers" not in service.methods_by_name:
        return None
    command = [
        sys.executable,
        "-m",
        "tests.bench.batch_get_users",
        "--database",
        db.kind,
        "--seconds",
        str(bench.seconds),
        "--rounds",
        str(bench.rounds),
        "--concurrency",
        str(bench.concurrency),
    ]
    bench.commands.append("batch-get: " + shlex.join(["python", *command[1:]]))
    # Exit status 1 is a cost above the target, reported in the JSON like any other ratio.
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode not in (0, 1) or not lines:
        raise RuntimeError(f"batch-get bench failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _import_hashes(per_format: int, *, cheap: bool) -> list[str]:
    """Password hashes as other systems store them, `per_format` of each format: the
    parameters do not change what an import costs (nothing is verified), so the smoke run
    makes cheap ones."""
    import base64
    import hashlib

    import bcrypt
    from argon2 import PasswordHasher, Type

    secret = BENCH_PASSWORD.encode()
    argon2 = PasswordHasher(
        time_cost=1 if cheap else 3,
        memory_cost=1024 if cheap else 65536,
        parallelism=1 if cheap else 4,
        type=Type.ID,
    )
    iterations = 1000 if cheap else 600_000
    made: list[str] = []
    for _ in range(per_format):
        made.append(argon2.hash(BENCH_PASSWORD))
        made.append(bcrypt.hashpw(secret, bcrypt.gensalt(4 if cheap else 10)).decode())
        salt = os.urandom(16)
        digest = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)

        def ab64(raw: bytes) -> str:
            return base64.b64encode(raw).decode().rstrip("=").replace("+", ".")

        made.append(f"$pbkdf2-sha256${iterations}${ab64(salt)}${ab64(digest)}")
        text_salt = uuid.uuid4().hex[:22]
        digest = hashlib.pbkdf2_hmac("sha256", secret, text_salt.encode(), iterations)
        made.append(f"pbkdf2_sha256${iterations}${text_salt}${base64.b64encode(digest).decode()}")
    return made


def _import_users(
    address: str, admin_token: str, total: int, batch_size: int, in_flight: int, hashes: list[str]
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    batches = [
        pb.BatchCreateUsersRequest(
            users=[
                pb.BatchCreateUserEntry(
                    email=f"import-{run}-{i}@example.com",
                    name=f"Imported {i}",
                    password_hash=hashes[i % len(hashes)],
                )
                for i in range(start, min(start + batch_size, total))
            ]
        )
        for start in range(0, total, batch_size)
    ]

    async def go() -> dict[str, Any]:
        created = failed = 0
        latencies: list[float] = []
        metadata = (("authorization", f"Bearer {admin_token}"),)
        queue = list(reversed(batches))
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 4 * 1024 * 1024)]
        ) as channel:
            stub = pb_grpc.UserServiceStub(channel)

            async def importer() -> None:
                nonlocal created, failed
                while queue:
                    request = queue.pop()
                    began = time.perf_counter()
                    response = await stub.BatchCreateUsers(request, metadata=metadata)
                    latencies.append(time.perf_counter() - began)
                    for result in response.results:
                        if result.status.code == 0:
                            created += 1
                        else:
                            failed += 1

            started = time.perf_counter()
            await asyncio.gather(*(importer() for _ in range(in_flight)))
            elapsed = time.perf_counter() - started
        return {
            "created": created,
            "failed": failed,
            "seconds": elapsed,
            "batch_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "batch_max_ms": round(max(latencies) * 1000, 1),
        }

    return asyncio.run(go())


def scenario_import(bench: Bench, db: Database, total: int) -> dict[str, Any]:
    """BatchCreateUsers of `total` users with imported hashes, 1,000 per call."""
    admin_token = mint_token(db.admin_id)
    batch_size, in_flight = 1000, 4
    smoke = bench.rounds == 1 and bench.seconds <= 1.0
    hashes = _import_hashes(2 if smoke else 16, cheap=smoke)
    with tempfile.TemporaryDirectory() as data_dir:
        env = usersvc_env(db.url, data_dir, 1)
        svc = start_server(USERSVC_CMD, env, Path(data_dir) / "usersvc.log")
        try:
            result = _import_users(svc.address, admin_token, total, batch_size, in_flight, hashes)
            require_all_ok(svc.log_path, "BatchCreateUsers")
            bench.note_memory("import", svc)
        finally:
            stop_server(svc)
    if result["failed"] or result["created"] != total:
        raise RuntimeError(f"import bench: entries failed: {result}")
    bench.commands.append(
        f"import: {total} users with imported hashes (Argon2id, bcrypt, PBKDF2-SHA256 passlib"
        f" and Django, in turn), BatchCreateUsers of {batch_size}, {in_flight} calls in flight"
        " (grpc.aio client)"
    )
    return {
        "scenario": "import",
        "database": db.kind,
        "users": total,
        "batch_size": batch_size,
        "in_flight": in_flight,
        "seconds": round(result["seconds"], 2),
        "users_per_second": round(total / result["seconds"], 1),
        "batch_p50_ms": result["batch_p50_ms"],
        "batch_max_ms": result["batch_max_ms"],
    }


# --- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import importlib.metadata

    import sqlalchemy

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError:
            return "unavailable"
        return (out.stdout or out.stderr).strip().splitlines()[0]

    import psycopg

    commit = (
        os.environ.get("BENCH_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    return {
        "commit": commit,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "argon2_cffi": importlib.metadata.version("argon2-cffi"),
        "h2load": version(["h2load", "--version"]),
        "postgresql": version(["psql", "--version"]),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def targets(results: dict[str, Any], bench: Bench) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def add(target: str, measured: float, limit: float, holds: bool, detail: str) -> None:
        found.append(
            {
                "target": target,
                "measured": measured,
                "limit": limit,
                "holds": holds,
                "detail": detail,
            }
        )

    get = {(r["database"], r["workers"]): r for r in results["getuser"]}
    for kind, key in (
        ("sqlite", "getuser_sqlite_ratio"),
        ("postgresql", "getuser_postgresql_ratio"),
    ):
        if (kind, 1) in get:
            ratio = get[(kind, 1)]["ratio"]
            add(f"1. GetUser/bare, {kind}, 1 worker", ratio, LIMITS[key], ratio >= LIMITS[key],
                f"≥ {LIMITS[key]}")  # fmt: skip
        if (kind, 1) in get and (kind, 2) in get:
            one, two = get[(kind, 1)]["ratio"], get[(kind, 2)]["ratio"]
            drop = round(1 - two / one, 3)
            add(
                f"1. GetUser/bare, {kind}, 2 workers vs 1",
                drop,
                LIMITS["two_worker_ratio_drop"],
                drop <= LIMITS["two_worker_ratio_drop"],
                f"2-worker ratio {two} vs 1-worker {one}: falls by ≤ 10%",
            )
    if results.get("hash_storm"):
        ratio = results["hash_storm"]["ratio"]
        limit = LIMITS["hash_storm_p99_ratio"]
        add("2. GetUser p99 storm/idle", ratio, limit, ratio <= limit, f"≤ {limit}")
    if results.get("create_vs_ceiling"):
        ratio = results["create_vs_ceiling"]["ratio"]
        limit = LIMITS["create_vs_ceiling"]
        add("3. CreateUser/hash ceiling", ratio, limit, ratio >= limit, f"≥ {limit}")
    if results.get("list_depth"):
        r = results["list_depth"]
        for size in (1, 50):
            for where, name in (("first", "first page"), ("deep", "95% depth")):
                value = r[f"{where}_{size}_vs_get"]
                limit = LIMITS[f"list_{where}_vs_get"]
                add(f"4. ListUsers {name}, page of {size}/GetUser ({r['users']} users)", value,
                    limit, value <= limit, f"≤ {limit}")  # fmt: skip
    peak = max(bench.peak_rss.values(), default=0.0)
    add("5. peak RSS per worker (MB)", round(peak, 1), LIMITS["peak_rss_mb"],
        peak <= LIMITS["peak_rss_mb"], f"≤ {LIMITS['peak_rss_mb']} MB")  # fmt: skip
    growth = 0.0
    for r in results["getuser"]:
        rounds = r["rss_mb_after_each_round"]
        if len(rounds) >= 3:
            for pid in rounds[0]:
                if pid in rounds[-1]:
                    growth = max(growth, rounds[-1][pid] - rounds[1][pid])
    add("5. RSS growth, round 2 to last (MB)", round(growth, 1), LIMITS["rss_growth_mb"],
        growth <= LIMITS["rss_growth_mb"], f"≤ {LIMITS['rss_growth_mb']} MB")  # fmt: skip
    return found


def markdown(report: dict[str, Any]) -> str:
    out = io.StringIO()
    m = report["machine"]
    out.write(f"# usersvc bench, {report['finished']}\n\n")
    out.write(
        f"Commit `{m['commit']}`, {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
        f"grpcio {m['grpcio']}, SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, "
        f"{m['postgresql']}, {m['h2load']}. Load average before {report['load_before']}, "
        f"after {report['load_after']}. Mode: {report['mode']}, {report['seconds']} s per "
        f"measurement, {report['rounds']} rounds, {report['users']} users seeded.\n\n"
    )
    out.write("| target | measured | limit | holds |\n|---|---|---|---|\n")
    for t in report["targets"]:
        out.write(
            f"| {t['target']} | {t['measured']} | {t['detail']} | "
            f"{'yes' if t['holds'] else '**no**'} |\n"
        )
    out.write(
        "\n| GetUser | usersvc req/s (rounds) | bare req/s (rounds) | ratio "
        "| server CPU µs/call usersvc / bare | CPU ratio |\n"
    )
    out.write("|---|---|---|---|---|---|\n")
    for r in report["results"]["getuser"]:
        out.write(
            f"| {r['database']}, {r['workers']} worker(s) | "
            f"{', '.join(str(x) for x in r['usersvc_rps'])} | "
            f"{', '.join(str(x) for x in r['bare_rps'])} | {r['ratio']} | "
            f"{r['usersvc_cpu_us_per_call']} / {r['bare_cpu_us_per_call']} | {r['cpu_ratio']} |\n"
        )
    out.write("\nPer-worker split (2 workers; calls from the access log, CPU from /proc):\n\n")
    for r in report["results"]["getuser"]:
        if r["workers"] > 1:
            parts = [
                f"pid {pid}: {w['call_share'] if w['call_share'] is not None else '?'} of calls, "
                f"{w['cpu_share']} of CPU"
                for pid, w in r["per_worker"].items()
            ]
            out.write(f"- {r['database']}: {'; '.join(parts)}\n")
    storm = report["results"].get("hash_storm")
    if storm:
        out.write(
            f"\nHash storm ({storm['database']}, GetUser at {storm['rate_rps']} req/s open loop): "
            f"idle p50/p99 {storm['idle_p50_ms']}/{storm['idle_p99_ms']} ms, during 8 CreateUser"
            f" + 8 Login in flight {storm['storm_p50_ms']}/{storm['storm_p99_ms']} ms; storm "
            f"calls {storm['storm_calls']}.\n"
        )
    create = report["results"].get("create_vs_ceiling")
    if create:
        out.write(
            f"\nCreateUser: {create['creates_per_second']}/s against "
            f"{create['hash_ceiling_per_second']} Argon2id hashes/s on {create['cores']} cores.\n"
        )
    lst = report["results"].get("list_depth")
    if lst:
        out.write(
            f"\nListUsers at {lst['users']} users (one call at a time): GetUser {lst['get_ms']} "
            f"ms; page of 1: first {lst['first_page_1_ms']} ms, 95% depth "
            f"{lst['deep_page_1_ms']} ms; page of 50: first {lst['first_page_50_ms']} ms, 95% "
            f"depth {lst['deep_page_50_ms']} ms.\n"
        )
    imported = report["results"].get("import")
    if imported:
        out.write(
            f"\nImport ({imported['database']}): {imported['users']} users with existing password"
            f" hashes through BatchCreateUsers ({imported['batch_size']} per call,"
            f" {imported['in_flight']} in flight) in {imported['seconds']} s:"
            f" {imported['users_per_second']} users/s; a batch took {imported['batch_p50_ms']} ms"
            f" (median), {imported['batch_max_ms']} ms at most.\n"
        )
    batch = report["results"].get("batch_get")
    if "batch_get" not in report["results"]:
        pass  # not selected (--only)
    elif batch is None:
        out.write("\nBatchGetUsers: not in this contract yet (scenario skipped).\n")
    else:
        out.write(
            f"\n{batch['benchmark']} ({batch['database']}): one batch costs "
            f"{batch['batch_cost']} GetUser calls (target at most {batch['max_batch_cost']};"
            f" rounds {batch['batch_cost_rounds']}).\n"
        )
    out.write("\nCommands:\n\n")
    for c in report["commands"]:
        out.write(f"- `{c}`\n")
    return out.getvalue()


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    print(f"{what}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


README_START, README_END = "<!-- bench:latest -->", "<!-- /bench:latest -->"


def update_readme(path: Path, report_md: str) -> None:
    """Put the latest run's tables between the README's bench markers."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        return
    body = report_md.split("\nCommands:", 1)[0].split("\n", 1)[1].strip()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    latest = f"{README_START}\nLatest run (`bench/results/latest.md`):\n\n{body}\n{README_END}"
    path.write_text(head + latest + tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds, not minutes; CI")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--users", type=int, default=int(os.environ.get("BENCH_USERS", "100000")))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated: getuser,storm,create,list,batchget,import (default: all)",
    )
    parser.add_argument(
        "--import-users", type=int, default=100_000, help="users the import scenario creates"
    )
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--readme", default="", help="README whose bench tables to update")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        print("h2load is required (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    seconds = args.seconds or (1.0 if args.smoke else 10.0)
    rounds = args.rounds or (1 if args.smoke else 3)
    if args.smoke:
        global WARM_UP_SECONDS
        WARM_UP_SECONDS = 0
    users = min(args.users, 2000) if args.smoke else args.users
    only = set(filter(None, args.only.split(","))) or {
        "getuser",
        "storm",
        "create",
        "list",
        "batchget",
        "import",
    }
    # The smoke run imports a few batches only.
    import_users = min(args.import_users, 3000) if args.smoke else args.import_users
    kinds = args.databases.split(",")
    bench = Bench(
        seconds=seconds, rounds=rounds, concurrency=args.concurrency, connections=args.connections
    )
    load_before = load_average()
    results: dict[str, Any] = {"getuser": []}
    with timed("databases"), databases(kinds, users) as dbs:
        if "getuser" in only:
            for kind in kinds:
                # The smoke run checks the 2-worker path on one database only.
                for workers in (1,) if args.smoke and kind == "postgresql" else (1, 2):
                    with timed(f"getuser {kind} {workers}"):
                        r = scenario_get_user(bench, dbs[kind], workers)
                    print(json.dumps(r), flush=True)
                    results["getuser"].append(r)
        pg = dbs.get("postgresql")
        if pg is not None:
            if "storm" in only:
                with timed("storm"):
                    results["hash_storm"] = scenario_hash_storm(bench, pg)
                print(json.dumps(results["hash_storm"]), flush=True)
            if "create" in only:
                with timed("create"):
                    results["create_vs_ceiling"] = scenario_create_vs_ceiling(bench, pg)
                print(json.dumps(results["create_vs_ceiling"]), flush=True)
            if "list" in only:
                with timed("list"):
                    results["list_depth"] = scenario_list_depth(bench, pg)
                print(json.dumps(results["list_depth"]), flush=True)
            if "batchget" in only:
                results["batch_get"] = scenario_batch_get(bench, pg)
            # Last: it adds its users to the database the other scenarios measured.
            if "import" in only:
                with timed("import"):
                    results["import"] = scenario_import(bench, pg, import_users)
                print(json.dumps(results["import"]), flush=True)
    report = {
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "smoke" if args.smoke else "full",
        "seconds": seconds,
        "rounds": rounds,
        "users": users,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "load_before": load_before,
        "load_after": load_average(),
        "machine": machine(),
        "results": results,
        "peak_rss_mb": {k: round(v, 1) for k, v in bench.peak_rss.items()},
        "commands": [
            f"python -m tests.bench.run {' '.join(sys.argv[1:])}".strip(),
            *bench.commands,
        ],
    }
    report["targets"] = targets(results, bench)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "latest"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    if args.readme and not args.smoke:
        update_readme(Path(args.readme), markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
