"""The metrics port: Prometheus' text format over HTTP, on its own thread."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """One line per scrape would drown the server log."""


class _ThreadedWSGIServer(WSGIServer):
    daemon_threads = True


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` at `/metrics` (and `/`) on `host:port`; `port` 0 picks one."""
    app = make_wsgi_app(registry)
    server = make_server(host, port, app, _ThreadedWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
