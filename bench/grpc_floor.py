"""The floor under sparseserve's server CPU per request: what a Python v2 gRPC server
costs per batch-1 ModelInfer before any serving logic, measured the same way as
bench/server_overhead.py, in one interleaved run.

Arms (every server pinned to CPU 0, the tritonclient.grpc.aio load on CPU 1):

- `aio, empty`: grpc.aio answering every request with the same zeros (bench/peers/bare_v2.py)
- `aio + interceptor, empty`: the same behind a pass-through `ServerInterceptor`
- `aio, onnxruntime`: grpc.aio running mlp_small inline in the handler, nothing else
- `aio, onnxruntime twice`: the same, running the model twice per request
- `aio, empty, writes the model's weight bytes`: zeros, after writing as many bytes of
  memory as mlp_small's weights (332 KiB): the model's memory traffic without the model
- `sync, empty` / `sync, onnxruntime`: the same on grpc's thread-pool server (4 threads)
- `sync, sparseserve's path`: a prototype, sparseserve's request path (V2Servicer,
  DataPlane, registry) driven synchronously from the thread-pool server's handlers
- `grpclib, empty`: zeros again, from grpclib (HTTP/2 in pure Python, no grpc core)
- `sparseserve`: the real server, as in server_overhead.py (metrics on, no batching)

so that, per level,

    sparseserve = aio, empty  +  (aio, onnxruntime - aio, empty)  +  sparseserve's own work
                  gRPC floor     the model, run inside the server    routing, validation,
                                                                       metrics, statistics

Writes bench/results/grpc_floor.json and bench/results/grpc_floor.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import (
    CLOCK_TICKS,
    BenchmarkError,
    LatencySummary,
    ProcessSample,
    check_errors,
    drive_unary,
    measure_onnxruntime,
    pin_thread,
)
from bench.peer_servers import PeerProcess
from bench.peers.bare_v2 import SparseServePath
from bench.report import (
    REPO_ROOT,
    Spread,
    environment,
    machine_lines,
    markdown_table,
    progress,
    rotated,
    write_results,
)
from bench.workload import (
    MODEL_NAME,
    MODEL_SIZES,
    SERVER_ARGS,
    build_repository,
    onnxruntime_session,
    random_inputs,
    triton_inputs,
)
from sparseserve.client.server_process import ServerProcess
from sparseserve.protocol import grpc_service_pb2 as pb

BARE = Path(__file__).resolve().parent / "peers" / "bare_v2.py"
# mlp_small's FP32 weights and biases: what one run of it reads.
WEIGHT_BYTES = 4 * sum(a * b + b for a, b in itertools.pairwise(MODEL_SIZES))
SPARSESERVE = "sparseserve"
# label -> bare_v2.py arguments (sparseserve itself is started by ServerProcess).
BARE_ARMS: dict[str, list[str]] = {
    "aio, empty": ["--transport", "aio"],
    "aio + interceptor, empty": ["--transport", "aio", "--interceptor"],
    "aio, onnxruntime": ["--transport", "aio", "--model", "{model}"],
    "aio, onnxruntime twice": ["--transport", "aio", "--model", "{model}", "--runs", "2"],
    "aio, empty, writes the model's weight bytes": [
        "--transport",
        "aio",
        "--sweep-bytes",
        str(WEIGHT_BYTES),
    ],
    "sync, empty": ["--transport", "sync"],
    "sync, onnxruntime": ["--transport", "sync", "--model", "{model}"],
    "sync, sparseserve's path": ["--transport", "sync", "--sparseserve", "{repository}"],
    "grpclib, empty": ["--transport", "grpclib"],
}
SECOND_RUN = "a second run of the model, right after the first"
SWEEP = "writing the model's weight bytes, without the model"
TARGET_US = 200.0  # issue 7: server CPU per request on mlp_small


@dataclass(frozen=True, slots=True)
class ArmRun:
    round: int
    arm: str
    concurrency: int
    requests: int
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float


async def measure(
    url: str, pid: int, arm: str, concurrency: int, requests: Sequence, args, round_index: int
) -> ArmRun:
    async with triton_aio.InferenceServerClient(url) as client:
        _, errors = await drive_unary(client, requests, concurrency, args.warmup, args.max_seconds)
        check_errors(errors, args.warmup, f"warm-up of {arm}")
        before = ProcessSample.read(pid)
        started = time.perf_counter()
        latencies, errors = await drive_unary(
            client, requests, concurrency, args.requests, args.max_seconds
        )
        wall = time.perf_counter() - started
        after = ProcessSample.read(pid)
    check_errors(errors, len(latencies) + len(errors), f"{arm} at concurrency {concurrency}")
    done = len(latencies)
    cpu_s = (after.cpu_ticks - before.cpu_ticks) / CLOCK_TICKS
    return ArmRun(
        round_index, arm, concurrency, done, done / wall, LatencySummary.of(latencies),
        cpu_s / done * 1e6,
    )  # fmt: skip


async def check_answers(urls: dict[str, str], model: Path, arrays: list[np.ndarray]) -> None:
    """Arms that run the model must answer what onnxruntime computes here."""
    session = onnxruntime_session(model, 1)
    requests = triton_inputs(arrays)
    for arm, url in urls.items():
        if "empty" in arm:
            continue
        async with triton_aio.InferenceServerClient(url) as client:
            for array, request in zip(arrays[:8], requests, strict=False):
                got = (await client.infer(MODEL_NAME, request)).as_numpy("output")
                want = session.run(["output"], {"input": array})[0]
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    raise BenchmarkError(f"{arm} answered {got}, onnxruntime computes {want}")


def in_process_us(repository: Path, arrays: list[np.ndarray], calls: int) -> float:
    """CPU µs per ModelInfer through sparseserve's own request path in this process, with
    no gRPC and warm caches: parse the request, route, decode, validate, run the model,
    record statistics, encode and serialise the answer (median of 5 batches of `calls`)."""
    path = SparseServePath(str(repository))
    requests = []
    for array in arrays:
        request = pb.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(name="input", datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
        requests.append(request.SerializeToString())

    def serve(data: bytes) -> bytes:
        return path.answer(pb.ModelInferRequest.FromString(data)).SerializeToString()

    for data in requests * 20:  # warm-up
        serve(data)
    batches = []
    for _ in range(5):
        started = time.process_time()
        for i in range(calls):
            serve(requests[i % len(requests)])
        batches.append((time.process_time() - started) / calls * 1e6)
    path.close()
    return statistics.median(batches)


def summarize(runs: Sequence[ArmRun], arms: Sequence[str], levels: Sequence[int]) -> dict:
    summary: dict[str, Any] = {}
    for concurrency in levels:
        level: dict[str, Any] = {}
        for arm in arms:
            mine = [r for r in runs if r.arm == arm and r.concurrency == concurrency]
            level[arm] = {
                "requests_per_s": Spread.of([r.requests_per_s for r in mine]),
                "server_cpu_us_per_request": Spread.of([r.server_cpu_us_per_request for r in mine]),
                "latency_p50_ms": statistics.median(r.latency_ms.p50 for r in mine),
                "latency_p99_ms": statistics.median(r.latency_ms.p99 for r in mine),
            }
        level["parts_us"] = _parts(runs, concurrency)
        summary[str(concurrency)] = level
    return summary


def _parts(runs: Sequence[ArmRun], concurrency: int) -> dict[str, Spread]:
    """sparseserve's CPU per request split into floor, model and its own work, each taken
    within a round (where the arms of a level ran back to back), then the median."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.concurrency == concurrency:
            by_round.setdefault(run.round, {})[run.arm] = run.server_cpu_us_per_request
    parts: dict[str, list[float]] = {}
    for cpu in by_round.values():
        split = {
            "gRPC floor (aio, empty)": cpu["aio, empty"],
            "the model inside the server": cpu["aio, onnxruntime"] - cpu["aio, empty"],
            "sparseserve's own work": cpu[SPARSESERVE] - cpu["aio, onnxruntime"],
            SECOND_RUN: cpu["aio, onnxruntime twice"] - cpu["aio, onnxruntime"],
            SWEEP: cpu["aio, empty, writes the model's weight bytes"] - cpu["aio, empty"],
            "a pass-through interceptor": cpu["aio + interceptor, empty"] - cpu["aio, empty"],
            "sync server instead of aio (empty)": cpu["sync, empty"] - cpu["aio, empty"],
            "sparseserve's path on the sync server instead": cpu["sync, sparseserve's path"]
            - cpu[SPARSESERVE],
        }
        for name, value in split.items():
            parts.setdefault(name, []).append(value)
    return {name: Spread.of(values) for name, values in parts.items()}


def render_markdown(report: dict) -> str:
    summary, setup = report["summary"], report["setup"]
    arms = setup["arms"]
    lines = [
        "# The gRPC floor: what a bare Python v2 server costs per request",
        "",
        f"Medians over {setup['rounds']} interleaved rounds, [min, max]. Server CPU per "
        "request: utime+stime of the server process (all threads) over a level / requests. "
        f"Every server pinned to CPU {setup['server_cpu']}, the tritonclient.grpc.aio load "
        f"on CPU {setup['client_cpu']}; batch-1 ModelInfer on {MODEL_NAME} "
        f"({'→'.join(map(str, MODEL_SIZES))} FP32).",
        "",
    ]
    rows = []
    for level, entry in summary.items():
        for arm in arms:
            figures = entry[arm]
            cpu, rps = figures["server_cpu_us_per_request"], figures["requests_per_s"]
            rows.append([
                level, arm, f"{rps.median:.0f} [{rps.min:.0f}, {rps.max:.0f}]",
                f"{figures['latency_p50_ms']:.2f}", f"{figures['latency_p99_ms']:.2f}",
                f"{cpu.median:.0f} [{cpu.min:.0f}, {cpu.max:.0f}]",
            ])  # fmt: skip
    lines += markdown_table(
        ["concurrency", "server", "req/s", "p50 ms", "p99 ms", "server CPU µs/req"],
        rows,
        left=2,
    )
    lines += [
        "",
        "## Where sparseserve's CPU per request goes",
        "",
        "Differences between arms within each round, median [min, max] over rounds, µs:",
        "",
    ]
    names = list(next(iter(summary.values()))["parts_us"])
    lines += markdown_table(
        ["part", *(f"c={level}" for level in summary)],
        [
            [name]
            + [
                f"{entry['parts_us'][name].median:.0f} "
                f"[{entry['parts_us'][name].min:.0f}, {entry['parts_us'][name].max:.0f}]"
                for entry in summary.values()
            ]
            for name in names
        ],
    )

    def span(part: str) -> str:
        medians = [e["parts_us"][part].median for e in summary.values()]
        return f"{min(medians):.0f}-{max(medians):.0f}"

    def best(arm: str) -> float:
        return min(e[arm]["server_cpu_us_per_request"].median for e in summary.values())

    lines += [
        "",
        f"Issue 7's target is ≤ {TARGET_US:.0f} µs server CPU per request on {MODEL_NAME}. "
        "At the best level of each, a grpc.aio server that does nothing costs "
        f"{best('aio, empty'):.0f} µs and one that only runs the model "
        f"{best('aio, onnxruntime'):.0f} µs; grpc's thread-pool server costs "
        f"{best('sync, empty'):.0f} µs doing nothing and {best('sync, onnxruntime'):.0f} µs "
        "running the model; grpclib, a gRPC stack without grpc's C core, costs "
        f"{best('grpclib, empty'):.0f} µs doing nothing.",
        "",
        "The model inside a server costs "
        f"{span('the model inside the server')} µs per request (across levels), but a "
        f"second run right after the first only {span(SECOND_RUN)} µs, and writing as many "
        f"bytes of memory as its weights, without running it, {span(SWEEP)} µs: the first "
        "run finds the caches cold after gRPC's work, and leaves them cold for gRPC.",
        "",
        "In this process, on the servers' core, with no gRPC and warm caches: sparseserve's "
        "request path (parse, route, decode, validate, run, record, encode, serialise) "
        f"costs {report['in_process']['sparseserve_request_path_us']:.1f} µs of CPU per "
        "request, of which onnxruntime alone, back to back, "
        f"{report['in_process']['onnxruntime_alone_us']:.1f} µs.",
        "",
        "## Setup",
        "",
        "- bare servers: `bench/peers/bare_v2.py` (ModelInfer only, no routing, validation, "
        "metrics or statistics; the sync server has 4 handler threads)",
        "- `sync, sparseserve's path`: `bare_v2.py --sparseserve`, a prototype: "
        "sparseserve's V2Servicer, DataPlane and registry run synchronously in the "
        "thread-pool server's 4 handler threads (inline, unbatched models only; not "
        "thread-safe; no metrics port)",
        "- `aio, onnxruntime twice`: `bare_v2.py --model M --runs 2`, the model run twice "
        "per request; `aio, empty, writes the model's weight bytes`: `bare_v2.py "
        f"--sweep-bytes {WEIGHT_BYTES}` (mlp_small's FP32 weights and biases), zeros after "
        "adding 1 to that many bytes of a numpy array",
        "- `grpclib, empty`: `bare_v2.py --transport grpclib` (grpclib and its pure-Python "
        "HTTP/2 library h2, from the `[dev]` extra)",
        f"- sparseserve: `sparseserve serve {' '.join(SERVER_ARGS)}` (Prometheus metrics on)",
        f"- per level and arm: {setup['warmup']} warm-up requests, then up to "
        f"{setup['requests']} requests or {setup['max_seconds']} s; arms rotate between "
        "rounds; answers of the arms that run the model checked against onnxruntime first",
        "",
        "## Machine",
        "",
        *machine_lines(report["environment"]),
        "",
    ]
    return "\n".join(lines)


async def run_rounds(args, urls: dict[str, str], pids: dict[str, int], model: Path) -> list:
    arrays = random_inputs(args.distinct_inputs, args.seed)
    await check_answers(urls, model, arrays)
    requests = triton_inputs(arrays)
    runs: list[ArmRun] = []
    for round_index in range(args.rounds):
        for concurrency in rotated(args.concurrency, round_index):
            for arm in rotated(list(urls), round_index):
                run = await measure(
                    urls[arm], pids[arm], arm, concurrency, requests, args, round_index
                )
                runs.append(run)
                progress(
                    f"round {round_index}: c={concurrency:<3} {arm:<26} "
                    f"{run.requests_per_s:6.0f} req/s  "
                    f"server CPU {run.server_cpu_us_per_request:5.0f} µs/req"
                )
    return runs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4000, help="per level and arm")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--distinct-inputs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparseserve-bench-") as tmp:
        root = Path(tmp)
        model = build_repository(root / "repository")
        peers = {
            arm: PeerProcess(
                [
                    sys.executable,
                    str(BARE),
                    *(
                        a.replace("{model}", str(model)).replace(
                            "{repository}", str(root / "repository")
                        )
                        for a in extra
                    ),
                    "--port",
                    "{grpc}",
                ],
                root,
                {},
                root / f"bare-{index}.log",
                args.server_cpu,
            )
            for index, (arm, extra) in enumerate(BARE_ARMS.items())
        }
        with ServerProcess(root / "repository", *SERVER_ARGS, cpu=args.server_cpu) as server:
            try:
                for peer in peers.values():
                    peer.start()
                for peer in peers.values():
                    peer.wait_ready([MODEL_NAME], timeout=60)
                pin_thread(args.server_cpu)  # measured alone, on the servers' core
                arrays = random_inputs(args.distinct_inputs, args.seed)
                hot = measure_onnxruntime(
                    onnxruntime_session(model, 1), arrays, args.requests, args.server_cpu, 0
                )
                in_process = {
                    "sparseserve_request_path_us": in_process_us(
                        root / "repository", arrays, args.requests
                    ),
                    "onnxruntime_alone_us": hot.cpu_us_per_run,
                }
                progress(f"in-process, warm caches: {in_process}")
                pin_thread(args.client_cpu)
                urls = {arm: peer.grpc_url for arm, peer in peers.items()}
                pids = {arm: peer.pid for arm, peer in peers.items()}
                urls[SPARSESERVE], pids[SPARSESERVE] = server.grpc_url, server.pid
                runs = asyncio.run(run_rounds(args, urls, pids, model))
            except BenchmarkError as exc:
                raise SystemExit(f"grpc_floor: {exc}") from exc
            finally:
                for peer in peers.values():
                    peer.stop()
    arms = [*BARE_ARMS, SPARSESERVE]
    report = {
        "benchmark": "grpc_floor",
        "environment": environment(),
        "setup": {
            **{k: v for k, v in vars(args).items() if k != "output_dir"},
            "arms": arms,
            "bare_arms": BARE_ARMS,
            "sparseserve_args": SERVER_ARGS,
        },
        "in_process": in_process,
        "summary": summarize(runs, arms, args.concurrency),
        "runs": runs,
    }
    write_results(args.output_dir, "grpc_floor", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
