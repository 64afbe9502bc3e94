"""Where a loaded sparseserve spends its CPU: py-spy samples of the real server under
batch-1 ModelInfer load on mlp_small, summed by function (self and cumulative) and by
part of the stack (gRPC's Cython layer, the event loop, sparseserve, onnxruntime, ...).

The server runs as in bench/server_overhead.py (pinned to CPU 0, one onnxruntime
thread, metrics on); tritonclient.grpc.aio drives it from CPU 1 while `py-spy record`
samples it without stopping it. py-spy sees Python frames only: time in gRPC's Cython
code shows as the self time of the frame that called it, `Handle._run` on the event
loop (gRPC's coroutines run as loop callbacks) and `Thread.run` in gRPC's poller thread.
(py-spy's `--native` would name C frames, but it pauses the process at every sample,
counts threads blocked in epoll as busy, and grpcio's library has no symbols.)

Writes bench/results/profile.json and bench/results/profile.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import tritonclient.grpc.aio as triton_aio

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import BenchmarkError, check_errors, drive_unary, pin_thread
from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    progress,
    write_results,
)
from bench.workload import (
    BATCHING_PBTXT,
    SERVER_ARGS,
    build_repository,
    random_inputs,
    triton_inputs,
)
from sparseserve.client.server_process import ServerProcess

# A sample's part of the server: its innermost frame's, by the file the frame is in.
# Frames that call into C (Cython) code with no Python frame below are named for what
# they run: gRPC's coroutines and callbacks on the loop, gRPC's poller thread.
CALLS_INTO_C = {
    "Handle._run (asyncio/events.py": "gRPC's Cython layer (run by the event loop)",
    "Thread.run (threading.py": "gRPC's poller thread (Cython)",
}
PARTS = (
    ("onnxruntime", ("onnxruntime/",)),
    ("sparseserve", ("sparseserve/",)),
    ("protobuf", ("google/protobuf/",)),
    ("numpy", ("numpy/",)),
    ("gRPC (Python)", ("grpc/",)),
    ("asyncio event loop (Python)", ("asyncio/", "selectors.py")),
)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("profile_server: py-spy is not installed (pip install py-spy)")
    return found


def part_of(innermost: str) -> str:
    for prefix, part in CALLS_INTO_C.items():
        if innermost.startswith(prefix):
            return part
    for part, needles in PARTS:
        if any(needle in innermost for needle in needles):
            return part
    return "other Python"


def aggregate(raw: str) -> dict:
    """py-spy's raw format ("frame;frame;... count" per line, outermost first) ->
    samples by function (self, cumulative) and by part of the stack."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        samples = int(count)
        total += samples
        if not frames:
            continue
        own[frames[-1]] += samples
        for frame in set(frames):
            cumulative[frame] += samples
        parts[part_of(frames[-1])] += samples
    return {"samples": total, "self": own, "cumulative": cumulative, "parts": parts}


async def load(url: str, args: argparse.Namespace, model: str, seconds: float) -> int:
    requests = triton_inputs(random_inputs(64, 0))
    async with triton_aio.InferenceServerClient(url) as client:
        _, errors = await drive_unary(client, requests, args.concurrency, 300, 10, model=model)
        check_errors(errors, 300, "warm-up")
        latencies, errors = await drive_unary(
            client, requests, args.concurrency, 10**9, seconds, model=model
        )
        check_errors(errors, len(latencies) + len(errors), "the profiled load")
    return len(latencies)


def profile(args: argparse.Namespace, server: ServerProcess) -> tuple[str, int]:
    output = Path(tempfile.mkdtemp()) / "profile.txt"
    command = [
        py_spy(), "record", "--pid", str(server.pid), "--duration", str(args.seconds),
        "--rate", str(args.rate), "--format", "raw", "--output", str(output), "--function",
        "--nonblocking",  # read the stacks without pausing the server
    ]  # fmt: skip
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Load for a little longer than py-spy samples, so that every sample is under load.
    requests = asyncio.run(load(server.grpc_url, args, "mlp_small", args.seconds + 2))
    _, stderr = spy.communicate(timeout=60)
    if spy.returncode != 0 or not output.exists():
        raise BenchmarkError(f"py-spy failed: {stderr.decode(errors='replace')}")
    return output.read_text(), requests


def render_markdown(report: dict) -> str:
    result, setup = report["result"], report["setup"]
    total = result["samples"]

    def share(count: int) -> str:
        return f"{count / total * 100:.1f} %"

    lines = [
        "# Profile: sparseserve under batch-1 ModelInfer load",
        "",
        f"py-spy at {setup['rate']} Hz for "
        f"{setup['seconds']} s on the server process (all threads, idle samples left out), "
        f"while tritonclient.grpc.aio sent batch-1 ModelInfer requests to mlp_small at "
        f"concurrency {setup['concurrency']} ({report['requests_per_s']:.0f} req/s); "
        f"dynamic batching {'on' if setup['batching'] else 'off'}; {total} samples.",
        "",
        "## By part of the server",
        "",
        "Each sample goes to the part of its innermost Python frame. py-spy sees no C or "
        "Cython frames: gRPC's Cython code shows as the self time of `Handle._run` (its "
        "coroutines and callbacks on the event loop) and of `Thread.run` (its poller thread), "
        "and `session.run` as onnxruntime's Python wrapper.",
        "",
    ]
    lines += markdown_table(
        ["part", "share of samples"],
        [[part, share(n)] for part, n in Counter(result["parts"]).most_common()],
    )
    for kind, title in (("self", "Self time"), ("cumulative", "Cumulative time")):
        lines += ["", f"## {title}: top {setup['top']} functions", ""]
        lines += markdown_table(
            ["function", "share of samples"],
            [
                [f"`{name}`", share(n)]
                for name, n in Counter(result[kind]).most_common(setup["top"])
            ],
        )
    lines += ["", "## Machine", "", *machine_lines(report["environment"]), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="how long py-spy samples")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--batching", action="store_true", help="mlp_small with batching")
    parser.add_argument("--top", type=int, default=25, help="functions per table")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparseserve-bench-") as tmp:
        build_repository(Path(tmp), BATCHING_PBTXT if args.batching else None)
        with ServerProcess(Path(tmp), *SERVER_ARGS, cpu=args.server_cpu) as server:
            pin_thread(args.client_cpu)
            progress(f"profiling {args.seconds} s at concurrency {args.concurrency} ...")
            try:
                raw, requests = profile(args, server)
            except BenchmarkError as exc:
                log = server.log()
                raise SystemExit(f"profile_server: {exc}\n--- server log ---\n{log}") from exc
    setup = {k: v for k, v in vars(args).items() if k != "output_dir"}
    report = {
        "benchmark": "profile_server",
        "environment": environment(),
        "setup": {**setup, "server_args": SERVER_ARGS},
        "requests_per_s": requests / (args.seconds + 2),
        "result": aggregate(raw),
    }
    write_results(args.output_dir, "profile", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
