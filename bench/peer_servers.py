"""The other servers the comparison benchmarks start beside sparseserve: the peers'
venvs under bench/.peers/ (MLServer, KServe; built with pip on first use), a server
process pinned to a core and waited on until its models are ready (PeerProcess), and
the model repositories each server reads. Used by compare_servers.py, rest.py and
grpc_floor.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import tritonclient.grpc as triton_sync

from bench.measure import BenchmarkError
from bench.report import progress

BENCH = Path(__file__).resolve().parent
PEERS_SRC = BENCH / "peers"  # the peers' runtimes and the bare v2 servers
PEERS_CACHE = BENCH / ".peers"  # git-ignored: the peers' venvs


def peer_requirements() -> dict[str, list[str]]:
    """What each peer venv gets: the peer, plus the onnxruntime and numpy this venv has,
    so that every server runs the same kernels."""
    shared = [f"onnxruntime=={metadata.version('onnxruntime')}"]
    shared.append(f"numpy=={metadata.version('numpy')}")
    return {"mlserver": ["mlserver==1.7.1", *shared], "kserve": ["kserve==0.21.0", *shared]}


# Versions recorded from each peer venv.
PEER_PACKAGES = (
    "mlserver", "kserve", "onnxruntime", "numpy", "grpcio", "protobuf", "pydantic",
    "fastapi", "uvicorn", "uvloop", "prometheus-client",
)  # fmt: skip


def ensure_venv(name: str, requirements: Sequence[str]) -> Path:
    """bench/.peers/<name>, a python3.11 venv with `requirements`; created once and
    reused while the requirements are unchanged. Returns its python."""
    venv = PEERS_CACHE / name
    python = venv / "bin" / "python"
    stamp = venv / "requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    progress(f"creating {venv} with {' '.join(requirements)} (once; reused later)")
    subprocess.run(["python3.11", "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", *requirements], check=True)
    stamp.write_text(wanted)
    return python


def venv_versions(python: Path) -> dict[str, str]:
    """The Python and PEER_PACKAGES versions installed in the venv of `python`."""
    script = (
        "import json, sys; from importlib import metadata as m\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({'python': sys.version.split()[0], "
        "**{p: v(p) for p in sys.argv[1:]}}))"
    )
    out = subprocess.run(
        [str(python), "-c", script, *PEER_PACKAGES], capture_output=True, text=True, check=True
    ).stdout
    return {k: v for k, v in json.loads(out).items() if v is not None}


def free_port() -> int:
    """A loopback TCP port free right now (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PeerProcess:
    """A peer server started from its venv, pinned to `cpu`, logging to a file."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], log: Path, cpu: int):
        self.grpc_port = free_port()
        self.command = ["taskset", "-c", str(cpu), *command]
        self.cwd, self.env, self.log_path = cwd, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the command (`{grpc}` in it becomes the gRPC port) in its own session."""
        command = [str(part).replace("{grpc}", str(self.grpc_port)) for part in self.command]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        """The started process's id (its session's leader)."""
        assert self.process is not None
        return self.process.pid

    @property
    def grpc_url(self) -> str:
        """Where its gRPC endpoint listens, as tritonclient takes it."""
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        """Everything it printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, models: Sequence[str], timeout: float) -> None:
        """Return once every one of `models` is ready; BenchmarkError (with the log) if the
        process exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        client = triton_sync.InferenceServerClient(self.grpc_url)
        try:
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise BenchmarkError(f"{self.command} exited early:\n{self.log()}")
                with contextlib.suppress(Exception):
                    if all(client.is_model_ready(m) for m in models):
                        return
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{self.command} not ready in {timeout}s:\n{self.log()}")
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM its whole session, SIGKILL after 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        # The whole session: MLServer may have started worker processes.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def mlserver_repository(root: Path, models: dict[str, Path], adaptive: bool, ports: dict) -> None:
    """settings.json and one model-settings.json per model, as MLServer's docs lay out."""
    root.mkdir(parents=True)
    settings = {
        "debug": False,  # True (the default) adds a gRPC access-log line per request
        "parallel_workers": 0,  # inference in the server process itself
        "host": "127.0.0.1",
        **ports,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, path in models.items():
        model_settings: dict[str, Any] = {
            "name": name,
            "implementation": "mlserver_onnx.OnnxRuntimeModel",
            "parameters": {"uri": str(path)},
        }
        if adaptive:
            model_settings |= {"max_batch_size": 32, "max_batch_time": 0.002}
        (root / name).mkdir()
        (root / name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))


def sparseserve_repository(root: Path, models: dict[str, Path], config: str | None) -> None:
    """A model repository linking `models`, each with `config` as its config.pbtxt if given."""
    for name, path in models.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").symlink_to(path)
        if config is not None:
            (root / name / "config.pbtxt").write_text(config)
