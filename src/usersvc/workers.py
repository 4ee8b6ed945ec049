"""Several server processes on one address (SO_REUSEPORT), forked before any gRPC object.

grpc.aio runs each server's Python code on one thread, so one process uses about one core;
the kernel spreads new connections over the worker processes. Each worker is a complete server
(its own pools and caches); revocations reach the other workers through the token cache's
short lifetime, exactly as they reach other replicas.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from types import FrameType

from usersvc.config import Settings

log = logging.getLogger(__name__)


def _reserve(listen_address: str) -> tuple[socket.socket, str]:
    """Bind (not listen) the address with SO_REUSEPORT, so port 0 becomes one concrete port
    that every worker can bind too; held until the workers are gone."""
    host, _, port = listen_address.rpartition(":")
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), int(port)))
    return sock, f"{host}:{sock.getsockname()[1]}"


def _run_worker(settings: Settings) -> None:
    from usersvc import event_loop
    from usersvc.server import serve

    code = 0
    try:
        event_loop.run(
            serve(settings, reuse_port=True, metrics_endpoint=False), settings.event_loop
        )
    except BaseException:
        log.exception("worker failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def serve_workers(settings: Settings) -> int:
    """Fork `settings.workers` servers on one address; forward SIGTERM/SIGINT; 0 if all
    stopped cleanly."""
    from pathlib import Path

    from usersvc.adapters.jwt_tokens import load_or_create_keys
    from usersvc.bootstrap import load_or_create_secret

    # Development secrets are made here, once, not by every worker at the same moment.
    load_or_create_secret(settings)
    load_or_create_keys(
        settings.jwt_signing_key_file, settings.verification_key_paths, Path(settings.data_dir)
    )
    reserved, address = _reserve(settings.listen_address)
    worker_settings = settings.model_copy(update={"listen_address": address})
    metrics_dir = None
    if settings.metrics_address:
        from usersvc import metrics

        # Before the fork: every worker writes its metrics into this run's directory.
        metrics_dir = metrics.enable_multiprocess()
    children: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            reserved.close()
            _run_worker(worker_settings)
        children.append(pid)
    endpoint = None
    if metrics_dir is not None:
        # After the fork (no thread is forked): one /metrics that sums every worker.
        endpoint = metrics.MetricsEndpoint(
            settings.metrics_address, metrics.multiprocess_registry()
        )

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("workers started", extra={"address": address, "workers": children})
    failed = False
    remaining = set(children)
    while remaining:
        pid, status = os.wait()
        remaining.discard(pid)
        if metrics_dir is not None:
            metrics.mark_worker_dead(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed = True
            log.error("worker exited", extra={"worker": pid, "status": status})
            # One worker down means the others should not go on half-staffed silently.
            forward(signal.SIGTERM, None)
    reserved.close()
    if endpoint is not None:
        endpoint.close()
    if metrics_dir is not None:
        metrics.disable_multiprocess(metrics_dir)
    return 1 if failed else 0
