"""The HTTP side: ``POST /webhook`` (MLflow deliveries), ``GET /healthz``; and the reconcile loop.

Limits that hold against slow or hostile clients (each answered with a JSON log line, never a
raw traceback):

* a whole-request deadline (``request_deadline_s``, default 10 s): a request whose line, headers
  and body have not all arrived by then is answered 400 and its connection closed, however
  slowly it drips (the socket timeout alone is per read); an idle kept-alive connection is closed;
* at most ``max_connections`` connections are handled at once; one more waits up to
  ``ACCEPT_WAIT_S`` for a free handler, then gets 503 (MLflow retries it);
* a listen backlog of ``LISTEN_BACKLOG`` (the kernel caps it at ``net.core.somaxconn``), so a burst
  of deliveries is queued, not reset.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipelines.trigger.service import Response, TriggerService

log = logging.getLogger("pipelines.trigger.http")

WEBHOOK_PATH = "/webhook"
HEALTH_PATH = "/healthz"
REQUEST_DEADLINE_S = 10.0
READ_TIMEOUT_S = REQUEST_DEADLINE_S  # the name it had when the limit was per read
MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 1024
ACCEPT_WAIT_S = 5.0
WRITE_TIMEOUT_S = 10.0


class _DeadlineReader(io.RawIOBase):
    """Reads from a socket until a deadline for the whole request, not per read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + REQUEST_DEADLINE_S
        self.received = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(remaining)
        count = self.sock.recv_into(buffer)
        if count:
            self.received = True
        return count


def _handler_for(service: TriggerService, deadline_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "puzzle-trigger"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = deadline_s
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to every response on a kept-alive connection.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            self.rfile.close()
            self._reader = _DeadlineReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)
            self._served = 0

        def handle_one_request(self) -> None:
            # http.server's own loop, with the deadline set for the whole request.
            self._reader.deadline = time.monotonic() + deadline_s
            self._reader.received = False
            # What parse_request would set: a request that never arrives is still answered.
            self.command, self.path, self.requestline = "", "", ""
            self.request_version = self.protocol_version
            try:
                self.raw_requestline = self.rfile.readline(65537)
                if len(self.raw_requestline) > 65536:
                    self._send(service.reject(414, "request line too long"), close=True)
                    return
                if not self.raw_requestline:
                    self.close_connection = True
                    return
                if not self.parse_request():
                    return
                method = getattr(self, f"do_{self.command}", None)
                if method is None:
                    self._send(Response(405, {"status": "method not allowed"}), close=True)
                    return
                method()
                self.wfile.flush()
                self._served += 1
            except TimeoutError:
                self.close_connection = True
                if self._served and not self._reader.received:
                    log.debug("idle connection closed", extra={"client": self.client_address[0]})
                    return
                self._send(
                    service.reject(400, f"request not complete within the {deadline_s:g} s deadline"),
                    close=True,
                )

        def _send(self, response: Response, *, close: bool = False) -> None:
            body = json.dumps(response.body).encode()
            self.connection.settimeout(WRITE_TIMEOUT_S)
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)
            except OSError as exc:
                self.close_connection = True
                log.info(
                    "client gone before the answer",
                    extra={"client": self.client_address[0], "error": str(exc)},
                )

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # Malformed request lines and headers (http.server's checks): a JSON answer and log line.
            self._send(service.reject(code, message or "malformed request"), close=True)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != HEALTH_PATH:
                self._send(Response(404, {"status": "not found"}))
                return
            self._send(Response(200, service.health()))

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != WEBHOOK_PATH:
                self._send(Response(404, {"status": "not found"}), close=True)
                return
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self._send(service.check_size(None) or Response(411, {}), close=True)
                return
            early = service.check_size(self.headers.get("Content-Length"))
            if early is not None:
                # The body is not read: close the connection instead of draining it.
                self._send(early, close=True)
                return
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            if len(body) < length:
                self._send(service.reject(400, "body shorter than its Content-Length"), close=True)
                return
            self._send(service.handle_delivery(dict(self.headers.items()), body))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            log.debug("http", extra={"client": self.client_address[0], "request": self.requestline})

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            log.info(
                "http",
                extra={
                    "client": self.client_address[0],
                    "method": self.command,
                    "path": self.path.split("?")[0],
                    "status": int(code) if str(code).isdigit() else code,
                },
            )

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    """A threading server with a connection cap, a large backlog and JSON error logs."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: Any, *, max_connections: int, backlog: int) -> None:
        self.request_queue_size = backlog
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=ACCEPT_WAIT_S):
            self.refused += 1
            log.warning(
                "connection refused: too many open connections",
                extra={"client": client_address[0], "status": 503, "max_connections": self.max_connections},
            )
            body = b'{"status": "busy"}'
            try:
                request.settimeout(1.0)
                head = (
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    f"Retry-After: 1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                request.sendall(head.encode() + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a raw traceback here; a JSON log line instead.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("connection dropped", extra={"client": client_address[0], "error": repr(exc)})
        else:
            log.error("request failed", extra={"client": client_address[0]}, exc_info=True)


class TriggerServer:
    """The HTTP server plus the reconcile loop, in background threads (``start``/``stop``)."""

    def __init__(
        self,
        service: TriggerService,
        host: str = "0.0.0.0",
        port: int = 8080,
        *,
        request_deadline_s: float = REQUEST_DEADLINE_S,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        self.service = service
        self.httpd = _HTTPServer(
            (host, port),
            _handler_for(service, request_deadline_s),
            max_connections=max_connections,
            backlog=backlog,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> TriggerServer:
        serve = threading.Thread(target=self.httpd.serve_forever, name="trigger-http", daemon=True)
        serve.start()
        self._threads.append(serve)
        interval = self.service.settings.reconcile_interval_s
        if interval > 0:
            loop = threading.Thread(
                target=self._reconcile_loop, args=(interval,), name="trigger-reconcile", daemon=True
            )
            loop.start()
            self._threads.append(loop)
        log.info(
            "trigger service listening",
            extra={"port": self.port, "backend": self.service.backend.name, "reconcile_interval_s": interval},
        )
        return self

    def _reconcile_loop(self, interval: float) -> None:
        # The first pass runs at once: it picks up requests made while the service was down.
        while True:
            try:
                self.service.reconcile()
            except Exception:  # noqa: BLE001 - the loop must survive an unreachable MLflow
                log.exception("reconcile pass failed")
            if self._stop.wait(interval):
                return

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (safe from a signal handler)."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Run until interrupted or :meth:`request_stop` (the CLI's ``serve``; SIGTERM in a pod)."""
        self.start()
        try:
            self._stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
