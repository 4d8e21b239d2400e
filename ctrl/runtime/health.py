"""/healthz, like kube-proxy's: healthy while syncs keep succeeding.

The body carries kube-proxy's fields (lastUpdated, currentTime,
nodeEligible), so probes and tools written for kube-proxy read it as they
are. Unhealthy (503) when changes are waiting and no sync has succeeded for
longer than `stale_after`, or before the first sync. It reads the status the
agent publishes (SyncStatus on a StatusBoard), never the agent itself: the
server runs in threads of its own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("sliceproxy.health")


def _rfc3339(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class SyncStatus:
    """What /healthz needs of the agent, published after each sync and
    each change it takes."""

    last_ok: float | None = None  # wall-clock time of the last successful sync; None: none yet
    pending: bool = True  # changes wait for a sync (or a full sync is due)


class StatusBoard:
    """The agent's latest SyncStatus: replaced whole by the agent, read by
    the HTTP threads (one reference: no torn reads)."""

    def __init__(self) -> None:
        self._status = SyncStatus()

    def publish(self, status: SyncStatus) -> None:
        self._status = status

    def get(self) -> SyncStatus:
        return self._status


class Health:
    def __init__(self, board: StatusBoard, stale_after: float = 60.0, metrics=None):
        self.board = board
        self.stale_after = stale_after
        self.metrics = metrics

    def status(self, count: bool = True) -> tuple[int, dict]:
        now = time.time()
        st = self.board.get()
        last = st.last_ok
        healthy = last is not None and (not st.pending or now - last <= self.stale_after)
        body = {
            "lastUpdated": _rfc3339(last),
            "currentTime": _rfc3339(now),
            "nodeEligible": True,
        }
        code = 200 if healthy else 503
        if count and self.metrics is not None:
            self.metrics.healthz.labels(code=str(code)).inc()
        return code, body


def serve(health: Health, address: str) -> ThreadingHTTPServer:
    """Serve /healthz on "host:port" in a daemon thread."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            code, body = health.status()
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("healthz: " + fmt, *args)

    srv = ThreadingHTTPServer((host, int(port)), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="healthz", daemon=True).start()
    log.info("serving /healthz on %s", address)
    return srv
