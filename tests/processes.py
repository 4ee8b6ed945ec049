"""`usersvc serve` as a separate process, its log lines collected as they come."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def server_env(database_url: str, data_dir: str, **values: str) -> dict[str, str]:
    from tests.support import TEST_SECRET, TEST_SIGNING_KEY

    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    env.update(
        USERSVC_LISTEN_ADDRESS="127.0.0.1:0",
        USERSVC_DATABASE_URL=database_url,
        USERSVC_DATA_DIR=data_dir,
        USERSVC_SECRET_KEY=TEST_SECRET,
        USERSVC_JWT_SIGNING_KEY_FILE=str(TEST_SIGNING_KEY),
        USERSVC_ACCESS_TOKEN_TTL_SECONDS="3600",
        USERSVC_RATE_LIMIT_READS="100000/second",
        USERSVC_RATE_LIMIT_WRITES="100000/second",
        USERSVC_RATE_LIMIT_LOGIN_PER_PEER="100000/second",
        USERSVC_RATE_LIMIT_LOGIN_PER_EMAIL="100000/second",
    )
    env.update(values)
    return env


class ServerProcess:
    """Starts `usersvc serve` and waits for its "serving" line; `address` is where it listens."""

    def __init__(self, env: dict[str, str], *, args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.lines: list[dict[str, Any]] = []
        self._served = threading.Event()
        self.address = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "usersvc", "serve", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._served.wait(60):
            self.kill()
            raise RuntimeError(f"server did not start: {self.lines[-5:]}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"message": raw.rstrip(), "level": "RAW"}
            self.lines.append(entry)
            if entry.get("message") == "serving":
                self.address = str(entry["address"])
                self._served.set()
        self._served.set()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait_for_line(self, message: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("message") == message:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} line in {timeout} s")
