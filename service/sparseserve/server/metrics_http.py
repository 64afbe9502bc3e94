"""The metrics port: Prometheus' text format over HTTP at `/metrics`, on its own thread.

Every other path is 404. prometheus_client's app answers any path with the metrics, so
an HTTP readiness probe or `tritonclient.http` pointed at this port by mistake read
`/v2/health/ready` as 200 and were always green.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """One line per scrape would drown the server log."""


class _ThreadedWSGIServer(WSGIServer):
    daemon_threads = True


def metrics_only(app: WsgiApp) -> WsgiApp:
    """`app` at `/metrics`; 404 with a plain-text hint anywhere else."""

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return app(environ, start_response)
        body = (
            f"404: this is the metrics port; metrics are at {METRICS_PATH}, "
            "and the v2 REST API is on the HTTP port\n"
        ).encode()
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return serve


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` at `/metrics` on `host:port`; `port` 0 picks one."""
    app = metrics_only(make_wsgi_app(registry))
    server = make_server(host, port, app, _ThreadedWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
