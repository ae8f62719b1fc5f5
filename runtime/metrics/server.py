"""``MetricsEndpoint``: an engine's opt-in Prometheus endpoint (``metrics_port``), on a daemon thread of its process.

The socket is bound when the endpoint is made (``open_metrics_endpoint``: before the model loads, so a port in use
fails the start before any weight is read) and served once the engine is up (``serve``). Port 0 takes any free
port; ``url`` says which. Each ``GET /metrics`` renders ``export.collect`` of the engine: one query to
the scheduler, answered between two steps; nothing is computed on the scheduler's hot path for a scrape.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import EngineConfig
from ..errors import ConfigError
from .export import CONTENT_TYPE

logger = logging.getLogger("xinf_sglang.runtime.metrics.collector")

__all__ = ["SOCKET_TIMEOUT_S", "MetricsEndpoint", "open_metrics_endpoint"]

SOCKET_TIMEOUT_S = 10.0
"""A connection idle (or trickling) this long is closed: each open connection holds one of the server's threads."""


class MetricsEndpoint:
    """A bound HTTP server answering ``GET /metrics`` with ``render()``; ``close`` stops it. A connection that
    sends nothing for ``socket_timeout_s`` is closed."""

    def __init__(self, host: str, port: int, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({e.strerror or e}); choose another metrics_port "
                "(0 = any free port) or metrics_host"
            ) from None
        self._server.daemon_threads = True
        self._server.socket_timeout_s = socket_timeout_s  # type: ignore[attr-defined]
        self._server.render = lambda: "# the engine is starting\n"  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    def serve(self, render: Callable[[], str]) -> None:
        """Answer scrapes with ``render()`` from now on (a thread per connection)."""
        self._server.render = render  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="sglite-metrics", daemon=True)
        self._thread.start()
        logger.info("sglite metrics at %s", self.url)

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()


def open_metrics_endpoint(config: EngineConfig) -> MetricsEndpoint | None:
    """The endpoint ``config`` asks for (bound, not yet serving), or None when ``metrics_port`` is unset."""
    if config.metrics_port is None:
        return None
    return MetricsEndpoint(config.metrics_host, config.metrics_port)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    def setup(self) -> None:
        # StreamRequestHandler applies ``timeout`` to the connection; BaseHTTPRequestHandler closes it on expiry.
        self.timeout = self.server.socket_timeout_s  # type: ignore[attr-defined]
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self._reply(404, "not found: the metrics are at /metrics\n")
            return
        try:
            body = self.server.render()  # type: ignore[attr-defined]
        except Exception as e:  # the engine is busy past the timeout, or shutting down: say so, keep serving
            self._reply(503, f"sglite metrics unavailable: {type(e).__name__}: {e}\n")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not worth a log line
        return


