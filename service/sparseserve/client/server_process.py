"""Run `sparseserve serve` as a child process: for the demo, the benchmarks and the tests,
which all want a real server on free ports and to know when it is ready."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO


class ServerProcess:
    """``with ServerProcess(repo) as server: server.grpc_url ...``

    Starts the server with gRPC, HTTP and metrics on port 0 (the kernel picks free
    ports), waits for the ready file the server writes once its startup models are
    loaded, and on exit sends SIGTERM and waits for a clean stop. `extra_args` are
    passed to `sparseserve serve`.
    """

    _log: IO[bytes]  # the server's output, opened by `start`

    def __init__(
        self,
        repository: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        cpu: int | str | None = None,
        startup_timeout: float = 60.0,
    ):
        self.repository = repository
        self.extra_args = extra_args
        self.env = env
        self.startup_timeout = startup_timeout
        self.cpu = cpu
        self._tmp = tempfile.TemporaryDirectory(prefix="sparseserve-")
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self.ready_file = Path(self._tmp.name) / "ready.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.returncode: int | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of the v2 REST endpoint, as tritonclient.http takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServerProcess:
        """Start the server (again, after `kill`, on the same ports if they were fixed)."""
        if self.process is not None:  # a restart: reap the old process first
            self.process.wait()
            self._log.close()
        self.ready_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "sparseserve", "serve",
            "--repository", str(self.repository),
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
            "--ready-file", str(self.ready_file),
            *self.extra_args,
        ]  # fmt: skip
        if self.cpu is not None:
            command = ["taskset", "-c", str(self.cpu), *command]
        env = {**os.environ, **(self.env or {})}
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"sparseserve exited with {self.process.returncode} before it was ready:\n"
                    + self.log()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"sparseserve not ready in {self.startup_timeout}s:\n{self.log()}"
                )
            time.sleep(0.02)
        info = json.loads(self.ready_file.read_text())
        self.grpc_port = info["grpc_port"]
        self.http_port = info.get("http_port")
        self.metrics_port = info["metrics_port"]
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; return the exit code (SIGKILL if it does not stop)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = self.process.wait()
        self._log.close()
        return self.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
