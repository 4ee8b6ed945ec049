"""A TCP proxy in a thread that a test can take down and bring back, to make a database
unreachable without touching the database server itself."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator


class TcpProxy:
    """Forwards 127.0.0.1:<port> to (host, target_port); `down()` drops every connection and
    refuses new ones until `up()`; `pause()` forwards nothing, keeping every connection open
    and leaving new ones unanswered (a hung database), until `resume()`."""

    def __init__(self, host: str, target_port: int) -> None:
        self._target = (host, target_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._stop = threading.Event()
        self._paused: dict[socket.socket, socket.socket | str] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self.up()
        self._thread.start()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            listener.setblocking(False)
            self._listener = listener
            self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._wake_w.send(b"x")

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._selector.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for sock in list(self._sockets):
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()
        self._wake_w.send(b"x")

    def pause(self) -> None:
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None:  # not the wake-up pipe
                    self._paused[key.fileobj] = key.data  # type: ignore[index]
                    self._selector.unregister(key.fileobj)
        self._wake_w.send(b"x")

    def resume(self) -> None:
        with self._lock:
            for sock, data in self._paused.items():
                self._selector.register(sock, selectors.EVENT_READ, data)
            self._paused.clear()
        self._wake_w.send(b"x")

    def close(self) -> None:
        self.resume()
        self.down()
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                with self._lock:
                    if key.data == "accept":
                        self._accept(key.fileobj)  # type: ignore[arg-type]
                    else:
                        self._forward(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            a.setblocking(False)
            self._sockets.add(a)
            self._selector.register(a, selectors.EVENT_READ, b)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            try:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
            except OSError:
                pass
        for sock in (source, sink):
            if sock in self._sockets:
                self._sockets.discard(sock)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                sock.close()


@contextlib.contextmanager
def proxied_database(database_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the PostgreSQL of `database_url`, and the URL that goes through it."""
    from sqlalchemy.engine import make_url

    target = make_url(database_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        yield proxy, url
    finally:
        proxy.close()
