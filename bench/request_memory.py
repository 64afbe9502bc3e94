"""Server memory under large requests: peak and retained RSS (issue 16, item 5).

Each scenario starts a fresh `sparseserve serve` on a one-model repository (`sink`, a
64 -> 1 Gemm, so the answer is small and the run cheap), samples the server's resident
set (VmRSS, every 10 ms) and sends pre-serialized ModelInferRequests over raw gRPC:

- `concurrent`: `--concurrency` requests of `--request-mib` MiB each, all at once; the
  statuses they got, the peak RSS above idle, the RSS once they are answered and again
  after `--idle-seconds`;
- `invalid`: `--invalid-count` requests of `--invalid-mib` MiB one after the other, each
  refused (FP64 where the model takes FP32, so the whole message is received and
  decoded before it is refused); the RSS after each, to see whether it ratchets.

`--server-arg` passes flags to the server (e.g. `--server-arg=--max-message-bytes=268435456`).
Writes `request_memory.json` and `.md` to `--output-dir` (default bench/results).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import REPO_ROOT, environment, machine_lines, write_results
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

MiB = 1024 * 1024
WIDTH = 64
INFER = "/inference.GRPCInferenceService/ModelInfer"


def build_repository(root: Path) -> Path:
    onnx_models.mlp(root / "sink" / "1" / "model.onnx", sizes=(WIDTH, 1))
    return root


def request_bytes(mib: float, datatype: str = "FP32") -> bytes:
    """A serialized ModelInferRequest for `sink` of about `mib` MiB of tensor data."""
    rows = int(mib * MiB) // (WIDTH * 4)
    itemsize = 8 if datatype == "FP64" else 4
    request = service_pb2.ModelInferRequest(model_name="sink")
    shape = [rows * 4 // itemsize, WIDTH]
    request.inputs.add(name="input", datatype=datatype, shape=shape)
    request.raw_input_contents.append(np.ones(rows * WIDTH, np.float32).tobytes())
    return request.SerializeToString()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The server's VmRSS every 10 ms, in a thread, while in use."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send(channel: grpc.Channel, data: bytes) -> str:
    call = channel.unary_unary(INFER)
    try:
        call(data, timeout=300)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def mb(value: int) -> float:
    return round(value / 1e6, 1)


def concurrent_scenario(
    repository: Path, args: argparse.Namespace, server_args: Sequence[str]
) -> dict[str, Any]:
    data = request_bytes(args.request_mib)
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with ServerProcess(repository, *server_args) as server:
        time.sleep(1.0)
        idle = rss_bytes(server.pid)
        with (
            grpc.insecure_channel(server.grpc_url, options=options) as channel,
            RssSampler(server.pid) as sampler,
            ThreadPoolExecutor(args.concurrency) as pool,
        ):
            started = time.perf_counter()
            statuses = list(pool.map(lambda _: send(channel, data), range(args.concurrency)))
            seconds = time.perf_counter() - started
        after = rss_bytes(server.pid)
        time.sleep(args.idle_seconds)
        later = rss_bytes(server.pid)
    return {
        "request_bytes": len(data),
        "concurrency": args.concurrency,
        "statuses": dict(Counter(statuses)),
        "seconds": round(seconds, 2),
        "idle_mb": mb(idle),
        "peak_above_idle_mb": mb(sampler.peak - idle),
        "after_mb": mb(after),
        "after_idle_mb": mb(later),
        "retained_mb": mb(later - idle),
    }


def invalid_scenario(
    repository: Path, args: argparse.Namespace, server_args: Sequence[str]
) -> dict[str, Any]:
    data = request_bytes(args.invalid_mib, "FP64")
    options = [("grpc.max_send_message_length", -1)]
    with ServerProcess(repository, *server_args) as server:
        time.sleep(1.0)
        idle = rss_bytes(server.pid)
        after_each, statuses = [], []
        with grpc.insecure_channel(server.grpc_url, options=options) as channel:
            for _ in range(args.invalid_count):
                statuses.append(send(channel, data))
                time.sleep(0.2)
                after_each.append(mb(rss_bytes(server.pid) - idle))
    return {
        "request_bytes": len(data),
        "statuses": dict(Counter(statuses)),
        "idle_mb": mb(idle),
        "above_idle_after_each_mb": after_each,
        "growth_first_to_last_mb": round(after_each[-1] - after_each[0], 1),
    }


def render(report: dict[str, Any]) -> str:
    c, i = report["concurrent"], report["invalid"]
    lines = [
        "# Server memory under large requests",
        "",
        f"Server flags: `{' '.join(report['setup']['server_args']) or '(defaults)'}`",
        "",
        f"## {c['concurrency']} concurrent requests of {mb(c['request_bytes'])} MB",
        "",
        "| statuses | seconds | idle MB | peak above idle MB | after MB | after "
        f"{report['setup']['idle_seconds']} s MB | retained MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {c['statuses']} | {c['seconds']} | {c['idle_mb']} | {c['peak_above_idle_mb']} "
        f"| {c['after_mb']} | {c['after_idle_mb']} | {c['retained_mb']} |",
        "",
        f"## {len(i['above_idle_after_each_mb'])} invalid requests of "
        f"{mb(i['request_bytes'])} MB, one after the other",
        "",
        f"Statuses {i['statuses']}; RSS above idle ({i['idle_mb']} MB) after each, MB: "
        f"{', '.join(str(v) for v in i['above_idle_after_each_mb'])} "
        f"(first to last: {i['growth_first_to_last_mb']:+} MB).",
        "",
        "## Machine",
        "",
        *machine_lines(report["environment"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request-mib", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--idle-seconds", type=float, default=30)
    parser.add_argument("--invalid-mib", type=float, default=50)
    parser.add_argument("--invalid-count", type=int, default=10)
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="request_memory", help="results file name")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repository = build_repository(Path(tmp))
        report = {
            "setup": {
                "server_args": args.server_args,
                "idle_seconds": args.idle_seconds,
                "rss_sample_interval_s": 0.01,
            },
            "concurrent": concurrent_scenario(repository, args, args.server_args),
            "invalid": invalid_scenario(repository, args, args.server_args),
            "environment": environment(),
        }
    write_results(args.output_dir, args.name, report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
