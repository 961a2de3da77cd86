"""The HTTP side: ``POST /webhook`` (MLflow deliveries), ``GET /healthz``; and the reconcile loop."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipelines.trigger.service import Response, TriggerService

log = logging.getLogger("pipelines.trigger.http")

WEBHOOK_PATH = "/webhook"
HEALTH_PATH = "/healthz"
READ_TIMEOUT_S = 10.0


def _handler_for(service: TriggerService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "puzzle-trigger"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S  # a client that stalls mid-body is dropped
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
        # the client's delayed ACK add ~40 ms to every response on a kept-alive connection.
        disable_nagle_algorithm = True

        def _send(self, response: Response, *, close: bool = False) -> None:
            body = json.dumps(response.body).encode()
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

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
            body = self.rfile.read(int(self.headers["Content-Length"]))
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


class TriggerServer:
    """The HTTP server plus the reconcile loop, in background threads (``start``/``stop``)."""

    def __init__(self, service: TriggerService, host: str = "0.0.0.0", port: int = 8080) -> None:
        self.service = service
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(service))
        self.httpd.daemon_threads = True
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
