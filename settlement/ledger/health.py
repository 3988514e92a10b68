"""The ledger worker's ``/healthz`` and ``/readyz`` (the chart's probes).

Alive: the read loop turned within ``stale_s`` and no writer thread failed (a
failed writer stops the worker; the kubelet restarts it and its entries stay
pending until reclaimed). Waiting on Redis or on the writers (PostgreSQL down)
counts as a turn: an outage of a dependency makes the worker not ready, never
a restart loop. Ready: the last read from Redis succeeded within ``stale_s``
and handed its batch to a writer.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WorkerHealth:
    def __init__(self, stale_s: float = 60.0) -> None:
        self.stale_s = stale_s
        self.last_turn = time.monotonic()
        self.last_read_ok: float | None = None
        self.failed: str | None = None

    def turned(self, read_ok: bool) -> None:
        self.last_turn = time.monotonic()
        if read_ok:
            self.last_read_ok = self.last_turn

    def answer(self, path: str, now: float) -> tuple[int, str]:
        """HTTP status and body for ``path`` at monotonic time ``now``."""
        if path == "/healthz":
            if self.failed is not None:
                return 503, f"writer failed: {self.failed}\n"
            if now - self.last_turn > self.stale_s:
                return 503, f"read loop stalled for {now - self.last_turn:.0f} s\n"
            return 200, "ok\n"
        if path == "/readyz":
            if self.last_read_ok is None:
                return 503, "not reading yet (Redis or the consumer group)\n"
            if now - self.last_read_ok > self.stale_s:
                return 503, f"no successful read for {now - self.last_read_ok:.0f} s\n"
            return 200, "ready\n"
        return 404, "not found\n"


def serve_health(health: WorkerHealth, host: str, port: int) -> ThreadingHTTPServer:
    """Answer the probes on a daemon thread; ``shutdown()`` the returned server to stop."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = health.answer(self.path, time.monotonic())
            payload = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ledger-health", daemon=True).start()
    return server
