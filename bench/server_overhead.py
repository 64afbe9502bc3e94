"""Server overhead: what a batch-1 request costs sparseserve beyond the model itself.

Serves a small MLP (64->256->256->10, FP32) from a real `sparseserve serve` process
pinned to one core, drives it from this process (pinned to another core) with
tritonclient's asyncio gRPC client at several concurrency levels, and reads the server's
CPU time from /proc before and after each level. Beside it, the same model run by
onnxruntime in-process on the server's core gives the pure compute cost, so

    server CPU per request - onnxruntime per run = what the server itself adds.

Each level is measured over two protocols: "unary" (one ModelInfer call per request,
`concurrency` calls in flight) and "stream" (`concurrency` requests in flight on one
ModelStreamInfer stream). Only the load loop differs; the accounting is the same.

Levels (and the protocols within a level) are repeated in rotated order over a few
rounds (the machine is shared and noisy); the report gives the median per level with
the min and max.

Writes bench/results/server_overhead.json (every number, with machine, versions and
command) and bench/results/server_overhead.md (the tables). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "mlp_small"
MODEL_SIZES = (64, 256, 256, 10)
INPUT_NAME, OUTPUT_NAME = "input", "output"
BATCH = 1
PROTOCOLS = ("unary", "stream")
PACKAGES = ("sparseserve", "onnxruntime", "grpcio", "protobuf", "tritonclient", "numpy")

# Reference points quoted in the issue (server CPU per batch-1 request, measured
# elsewhere, not by this script).
REFERENCES_US = {
    "KServe 0.21": 520.0,
    "MLServer 1.7": 680.0,
    "onnxruntime alone": 10.0,
}
TARGET_US = 250.0

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """The benchmark could not produce trustworthy numbers (e.g. a request failed)."""


# -- measurements ----------------------------------------------------------------------


def _stat(path: Path) -> tuple[str, list[str]]:
    """(command name, fields from field 3 on) of a /proc/.../stat file."""
    text = path.read_text()
    # The command name (field 2) may hold spaces and parentheses: split around it.
    name = text[text.index("(") + 1 : text.rindex(")")]
    return name, text.rpartition(")")[2].split()


# In the fields from _stat, field N of proc(5) is at index N - 3.
_UTIME, _STIME, _RSS = 14 - 3, 15 - 3, 24 - 3


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """CPU time and memory of a process at one instant, from /proc/<pid>/stat, and the CPU
    time and context switches of each of its threads, from /proc/<pid>/task/."""

    cpu_ticks: int  # utime + stime of all threads (exited ones included), in clock ticks
    rss_bytes: int
    threads: dict[int, tuple[str, int, int]]  # tid -> (name, cpu ticks, context switches)

    @classmethod
    def read(cls, pid: int) -> ProcessSample:
        _, fields = _stat(Path(f"/proc/{pid}/stat"))
        threads = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name, task_fields = _stat(task / "stat")
                status = (task / "status").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            switches = sum(
                int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
            )
            ticks = int(task_fields[_UTIME]) + int(task_fields[_STIME])
            threads[int(task.name)] = (name, ticks, switches)
        return cls(
            cpu_ticks=int(fields[_UTIME]) + int(fields[_STIME]),
            rss_bytes=int(fields[_RSS]) * PAGE_BYTES,
            threads=threads,
        )


def thread_group(pid: int, tid: int, name: str) -> str:
    """Which part of the server a thread belongs to (threads have no Python names in /proc)."""
    if tid == pid:
        return "event loop"
    if name.startswith(("event_engine", "grpc_", "lifeguard")):
        return "gRPC core"
    return "other threads"  # the inference pool, gRPC's asyncio poller, metrics HTTP


def per_thread_group(
    pid: int, before: ProcessSample, after: ProcessSample, requests: int
) -> tuple[dict[str, float], float]:
    """(server CPU µs per request by thread group, context switches per request)."""
    cpu_us: dict[str, float] = {}
    switches = 0
    for tid, (name, ticks, count) in after.threads.items():
        _, ticks_before, count_before = before.threads.get(tid, (name, 0, 0))
        group = thread_group(pid, tid, name)
        used = (ticks - ticks_before) / CLOCK_TICKS / requests * 1e6
        cpu_us[group] = cpu_us.get(group, 0.0) + used
        switches += count - count_before
    return dict(sorted(cpu_us.items())), switches / requests


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a set of latencies, in milliseconds."""

    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, latencies_ns: Sequence[int]) -> LatencySummary:
        ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(float(p50), float(p95), float(p99), float(ms.mean()), float(ms.max()))


@dataclass(frozen=True, slots=True)
class LevelRun:
    """One protocol at one concurrency level in one round."""

    round: int
    protocol: str  # "unary" or "stream"
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_ticks: int
    server_cpu_us_per_request: float
    server_core_busy: float  # server CPU seconds / wall seconds (1.0: its core is saturated)
    server_cpu_us_by_thread: dict[str, float]  # per request, by thread_group()
    server_context_switches_per_request: float
    client_cpu_us_per_request: float
    server_request_us: float  # the server's own ModelStatistics: decoded request -> result
    server_compute_us: float  # ... and of that, the backend call (executor hop included)
    server_rss_mib: float


@dataclass(frozen=True, slots=True)
class OnnxRuntimeRun:
    """In-process onnxruntime on the server's core: the pure compute cost of one request.

    "hot": back-to-back runs, as a microbenchmark sees them. "cold": a buffer larger than
    the core's cache is written between runs (untimed), as the server's request handling
    does between two runs of the model.
    """

    round: int
    caches: str  # "hot" or "cold"
    runs: int
    wall_us_p50: float
    wall_us_p99: float
    wall_us_mean: float
    cpu_us_per_run: float


@dataclass(frozen=True, slots=True)
class Spread:
    """Median, min and max of one figure across rounds."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


# -- setup -----------------------------------------------------------------------------


def build_repository(root: Path, batching: str | None = None) -> Path:
    """A model repository holding only mlp_small (batched with `batching`, config.pbtxt
    text, if given); returns the model file."""
    if batching is not None:
        (root / MODEL_NAME).mkdir(parents=True, exist_ok=True)
        (root / MODEL_NAME / "config.pbtxt").write_text(batching)
    return onnx_models.mlp(root / MODEL_NAME / "1" / "model.onnx", sizes=MODEL_SIZES)


# sparseserve as grpc_floor.py and profile_server.py start it: one onnxruntime thread,
# the inference threads of a 2-core machine, no per-request logging.
SERVER_ARGS = ["--intra-op-threads", "1", "--inference-threads", "2", "--log-level", "WARNING"]

BATCHING_PBTXT = (
    "max_batch_size: 64\n"
    "dynamic_batching { max_queue_delay_microseconds: 500 }\n"
    "instance_group [{ count: 1 kind: KIND_CPU }]\n"
)


def random_inputs(count: int, seed: int) -> list[np.ndarray]:
    """`count` distinct batch-1 inputs, generated before any timing starts."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((BATCH, MODEL_SIZES[0])).astype(np.float32) for _ in range(count)]


def triton_inputs(arrays: Sequence[np.ndarray]) -> list[list[InferInput]]:
    """One ready-to-send tritonclient input list per array (reused across requests)."""
    requests = []
    for array in arrays:
        tensor = InferInput(INPUT_NAME, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        requests.append([tensor])
    return requests


def onnxruntime_session(model: Path, intra_op_threads: int) -> ort.InferenceSession:
    """A session configured like the server's onnxruntime backend."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def pin_thread(cpu: int | None) -> set[int]:
    """Pin the calling thread (and threads it starts later) to `cpu`; return the old set."""
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return previous


# -- onnxruntime alone -----------------------------------------------------------------


def measure_onnxruntime(
    session: ort.InferenceSession,
    arrays: Sequence[np.ndarray],
    runs: int,
    cpu: int | None,
    round_index: int,
    flush: np.ndarray | None = None,
) -> OnnxRuntimeRun:
    """Time `runs` batch-1 `session.run` calls on `cpu` (the server's core); with `flush`,
    write that buffer before each run so that the run starts with cold caches."""
    previous = pin_thread(cpu)
    try:
        for i in range(min(runs, 200)):
            session.run([OUTPUT_NAME], {INPUT_NAME: arrays[i % len(arrays)]})
        wall = np.empty(runs, dtype=np.int64)
        flush_ns = 0
        cpu_started = time.thread_time_ns()
        for i in range(runs):
            if flush is not None:
                flush_started = time.thread_time_ns()
                flush += 1
                flush_ns += time.thread_time_ns() - flush_started
            feeds = {INPUT_NAME: arrays[i % len(arrays)]}
            started = time.perf_counter_ns()
            session.run([OUTPUT_NAME], feeds)
            wall[i] = time.perf_counter_ns() - started
        cpu_ns = time.thread_time_ns() - cpu_started - flush_ns
    finally:
        os.sched_setaffinity(0, previous)
    us = wall / 1e3
    return OnnxRuntimeRun(
        round=round_index,
        caches="hot" if flush is None else "cold",
        runs=runs,
        wall_us_p50=float(np.percentile(us, 50)),
        wall_us_p99=float(np.percentile(us, 99)),
        wall_us_mean=float(us.mean()),
        cpu_us_per_run=cpu_ns / runs / 1e3,
    )


# -- the server under load ---------------------------------------------------------------


# What a load loop returns: (latencies of the answered requests in ns, error messages).
Load = tuple[list[int], list[str]]
# Where a load loop puts each successful result, by request index, when asked to.
Answers = dict[int, InferResult]


async def drive_unary(
    client: triton_aio.InferenceServerClient,
    requests: Sequence[list[InferInput]],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    answers: Answers | None = None,
    model: str = MODEL_NAME,
) -> Load:
    """`concurrency` workers send batch-1 ModelInfer requests to `model` back to back
    until `max_requests` were sent or `max_seconds` passed."""
    latencies: list[int] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            index = sent
            sent += 1
            started = time.perf_counter_ns()
            try:
                result = await client.infer(model, requests[index % len(requests)])
            except InferenceServerException as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter_ns() - started)
            if answers is not None:
                answers[index] = result

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def drive_stream(
    client: triton_aio.InferenceServerClient,
    requests: Sequence[list[InferInput]],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    answers: Answers | None = None,
) -> Load:
    """Batch-1 requests on one ModelStreamInfer stream, `concurrency` of them unanswered
    at any time (the next one is sent as an answer arrives), until `max_requests` were
    sent or `max_seconds` passed. Answers are matched to requests by request id."""
    latencies: list[int] = []
    errors: list[str] = []
    sent_at: dict[str, int] = {}  # request id -> send time in ns, unanswered, oldest first
    window = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + max_seconds

    async def send() -> AsyncIterator[dict[str, Any]]:
        for index in range(max_requests):
            await window.acquire()
            if time.perf_counter() >= deadline:
                return
            request_id = str(index)
            sent_at[request_id] = time.perf_counter_ns()
            inputs = requests[index % len(requests)]
            yield {"model_name": MODEL_NAME, "inputs": inputs, "request_id": request_id}

    try:
        async for result, error in client.stream_infer(send()):
            received = time.perf_counter_ns()
            window.release()
            if error is not None:
                # An error answer carries no id; the server answers in request order.
                sent_at.pop(next(iter(sent_at)))
                errors.append(str(error))
                continue
            request_id = result.get_response().id
            latencies.append(received - sent_at.pop(request_id))
            if answers is not None:
                answers[int(request_id)] = result
    except (InferenceServerException, grpc.RpcError) as exc:  # the stream itself failed
        errors.append(f"stream failed: {exc}")
    return latencies, errors


LoadLoop = Callable[..., Awaitable[Load]]
LOAD_LOOPS: dict[str, LoadLoop] = {"unary": drive_unary, "stream": drive_stream}


async def model_statistics(client: triton_aio.InferenceServerClient) -> tuple[int, int, int]:
    """(successful requests, their total ns, total compute ns) from ModelStatistics."""
    stats = (await client.get_inference_statistics(MODEL_NAME)).model_stats[0].inference_stats
    return stats.success.count, stats.success.ns, stats.compute_infer.ns


def check_errors(errors: Sequence[str], total: int, what: str) -> None:
    if errors:
        raise BenchmarkError(
            f"{len(errors)} of {total} requests failed during {what}; first error: {errors[0]}"
        )


async def measure_level(
    client: triton_aio.InferenceServerClient,
    server_pid: int,
    requests: Sequence[list[InferInput]],
    protocol: str,
    concurrency: int,
    args: argparse.Namespace,
    round_index: int,
) -> LevelRun:
    """Warm up, then load the server at `concurrency` over `protocol` and account for its
    CPU time."""
    drive = LOAD_LOOPS[protocol]
    what = f"{protocol} at concurrency {concurrency}"
    _, errors = await drive(client, requests, concurrency, args.warmup, args.max_seconds)
    check_errors(errors, args.warmup, f"warm-up, {what}")

    stats_before = await model_statistics(client)
    server_before = ProcessSample.read(server_pid)
    client_before = time.process_time()
    started = time.perf_counter()
    latencies, errors = await drive(client, requests, concurrency, args.requests, args.max_seconds)
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    server_after = ProcessSample.read(server_pid)
    stats_after = await model_statistics(client)

    done = len(latencies)
    check_errors(errors, done + len(errors), f"round {round_index}, {what}")
    if done == 0:
        raise BenchmarkError(f"no request completed, {what}")
    ticks = server_after.cpu_ticks - server_before.cpu_ticks
    served, request_ns, compute_ns = (a - b for a, b in zip(stats_after, stats_before, strict=True))
    if served != done:
        raise BenchmarkError(
            f"{what}: the server counted {served} successful requests, the client {done}"
        )
    server_cpu_s = ticks / CLOCK_TICKS
    by_thread, switches = per_thread_group(server_pid, server_before, server_after, done)
    return LevelRun(
        round=round_index,
        protocol=protocol,
        concurrency=concurrency,
        requests=done,
        errors=len(errors),
        wall_s=wall,
        requests_per_s=done / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_ticks=ticks,
        server_cpu_us_per_request=server_cpu_s / done * 1e6,
        server_core_busy=server_cpu_s / wall,
        server_cpu_us_by_thread=by_thread,
        server_context_switches_per_request=switches,
        client_cpu_us_per_request=client_cpu / done * 1e6,
        server_request_us=request_ns / done / 1e3,
        server_compute_us=compute_ns / done / 1e3,
        server_rss_mib=server_after.rss_bytes / MiB,
    )


async def check_answers(
    client: triton_aio.InferenceServerClient,
    session: ort.InferenceSession,
    arrays: Sequence[np.ndarray],
    requests: Sequence[list[InferInput]],
    protocol: str,
) -> None:
    """The server must answer what onnxruntime computes, or its timings mean nothing:
    one request per input, 8 at a time, through the protocol's load loop."""
    answers: Answers = {}
    _, errors = await LOAD_LOOPS[protocol](client, requests, 8, len(requests), 60.0, answers)
    check_errors(errors, len(requests), f"the {protocol} answer check")
    for index, array in enumerate(arrays):
        result = answers.get(index)
        got = None if result is None else result.as_numpy(OUTPUT_NAME)
        (want,) = session.run([OUTPUT_NAME], {INPUT_NAME: array})
        if got is None or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            raise BenchmarkError(
                f"{protocol}: the server answered {got} to input {index}, "
                f"onnxruntime computes {want}"
            )


T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """Levels (or protocols) in a different order each round, so that drift does not
    favour one of them."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def server_args(args: argparse.Namespace) -> list[str]:
    extra = [
        "--intra-op-threads", str(args.intra_op_threads),
        "--inference-threads", str(args.inference_threads),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if args.no_metrics:
        extra.append("--no-metrics")
    return extra


async def run_rounds(
    args: argparse.Namespace, model: Path, server: ServerProcess
) -> tuple[list[OnnxRuntimeRun], list[LevelRun], int]:
    """All rounds: onnxruntime alone, then every level against the server.
    Returns the runs and the server's peak RSS in bytes."""
    arrays = random_inputs(args.distinct_inputs, args.seed)
    requests = triton_inputs(arrays)
    session = onnxruntime_session(model, args.intra_op_threads)
    flush = np.zeros(args.flush_mib * MiB // 8)
    ort_runs: list[OnnxRuntimeRun] = []
    level_runs: list[LevelRun] = []
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        for protocol in args.protocol:
            await check_answers(client, session, arrays, requests, protocol)
        for round_index in range(args.rounds):
            hot = measure_onnxruntime(session, arrays, args.ort_runs, args.server_cpu, round_index)
            cold = measure_onnxruntime(
                session, arrays, args.ort_cold_runs, args.server_cpu, round_index, flush
            )
            ort_runs += [hot, cold]
            progress(
                f"round {round_index}: onnxruntime {hot.cpu_us_per_run:.1f} µs CPU/run hot, "
                f"{cold.cpu_us_per_run:.1f} cold"
            )
            # Both protocols back to back at each level (in alternating order), so that
            # their ratio is measured under the same conditions.
            for concurrency in rotated(args.concurrency, round_index):
                for protocol in rotated(args.protocol, round_index):
                    run = await measure_level(
                        client, server.pid, requests, protocol, concurrency, args, round_index
                    )
                    level_runs.append(run)
                    progress(
                        f"round {round_index}: {protocol:<6} c={concurrency:<3} "
                        f"{run.requests_per_s:8.0f} req/s  p50 {run.latency_ms.p50:6.2f} ms  "
                        f"server CPU {run.server_cpu_us_per_request:6.0f} µs/req"
                    )
    return ort_runs, level_runs, _peak_rss(server.pid)


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- summary and reports -----------------------------------------------------------------


def _spread(runs: Sequence[Any], get: Callable[[Any], float]) -> Spread:
    return Spread.of([get(run) for run in runs])


def summarize(ort_runs: Sequence[OnnxRuntimeRun], level_runs: Sequence[LevelRun]) -> dict:
    """Median/min/max across rounds, per protocol and level; overhead is server CPU minus
    onnxruntime (hot), the figure a microbenchmark of the model alone gives. With both
    protocols, also stream/unary ratios, paired within each round and level."""
    onnxruntime = {
        caches: {
            "cpu_us_per_run": _spread(runs, lambda r: r.cpu_us_per_run),
            "wall_us_p50": _spread(runs, lambda r: r.wall_us_p50),
        }
        for caches in ("hot", "cold")
        if (runs := [r for r in ort_runs if r.caches == caches])
    }
    ort_us = onnxruntime["hot"]["cpu_us_per_run"].median
    protocols: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        if not (runs := [r for r in level_runs if r.protocol == protocol]):
            continue
        levels = {
            str(c): _summarize_level([r for r in runs if r.concurrency == c], ort_us)
            for c in sorted({r.concurrency for r in runs})
        }
        worst = max(levels, key=lambda c: levels[c]["server_cpu_us_per_request"].median)
        worst_us = levels[worst]["server_cpu_us_per_request"].median
        protocols[protocol] = {
            "levels": levels,
            "worst_concurrency": int(worst),
            "worst_server_cpu_us_per_request": worst_us,
            "target_met": worst_us <= TARGET_US,
        }
    return {
        "onnxruntime": onnxruntime,
        "protocols": protocols,
        "stream_vs_unary": _stream_vs_unary(level_runs),
        "target_us": TARGET_US,
        "target_met": all(p["target_met"] for p in protocols.values()),
    }


def _summarize_level(runs: Sequence[LevelRun], ort_us: float) -> dict[str, Any]:
    """One protocol at one concurrency level, across rounds."""
    cpu = _spread(runs, lambda r: r.server_cpu_us_per_request)
    groups = sorted({group for r in runs for group in r.server_cpu_us_by_thread})
    return {
        "requests_per_s": _spread(runs, lambda r: r.requests_per_s),
        "latency_p50_ms": _spread(runs, lambda r: r.latency_ms.p50),
        "latency_p95_ms": _spread(runs, lambda r: r.latency_ms.p95),
        "latency_p99_ms": _spread(runs, lambda r: r.latency_ms.p99),
        "server_cpu_us_per_request": cpu,
        "server_overhead_us_per_request": cpu.median - ort_us,
        "server_cpu_us_by_thread": {
            group: _spread(runs, lambda r, g=group: r.server_cpu_us_by_thread.get(g, 0.0))
            for group in groups
        },
        "server_context_switches_per_request": _spread(
            runs, lambda r: r.server_context_switches_per_request
        ),
        "server_core_busy": _spread(runs, lambda r: r.server_core_busy),
        "client_cpu_us_per_request": _spread(runs, lambda r: r.client_cpu_us_per_request),
        "server_request_us": _spread(runs, lambda r: r.server_request_us),
        "server_compute_us": _spread(runs, lambda r: r.server_compute_us),
        "server_rss_mib": _spread(runs, lambda r: r.server_rss_mib),
        "errors": sum(r.errors for r in runs),
        "target_met": cpu.median <= TARGET_US,
    }


def _stream_vs_unary(level_runs: Sequence[LevelRun]) -> dict[str, dict[str, Spread]]:
    """Per level, stream / unary of server CPU and of req/s, each ratio taken within one
    round (the two ran back to back), then median/min/max across rounds."""
    by_key = {(r.protocol, r.round, r.concurrency): r for r in level_runs}
    ratios: dict[str, dict[str, Spread]] = {}
    for concurrency in sorted({r.concurrency for r in level_runs}):
        pairs = [
            (unary, stream)
            for round_index in sorted({r.round for r in level_runs})
            if (unary := by_key.get(("unary", round_index, concurrency)))
            and (stream := by_key.get(("stream", round_index, concurrency)))
        ]
        if pairs:
            ratios[str(concurrency)] = {
                "server_cpu_us_per_request": Spread.of(
                    [s.server_cpu_us_per_request / u.server_cpu_us_per_request for u, s in pairs]
                ),
                "requests_per_s": Spread.of(
                    [s.requests_per_s / u.requests_per_s for u, s in pairs]
                ),
            }
    return ratios


def environment() -> dict[str, Any]:
    """Where and with what the numbers were taken, to reproduce a figure."""
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": _git_state(),
        "command": shlex.join(sys.orig_argv),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> dict[str, Any]:
    """The commit, and whether (and where) the work tree differs from it."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.rstrip("\n")

    try:
        changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(changed),
            "changed_paths": changed,
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None, "changed_paths": []}


def fmt_spread(spread: Spread, digits: int = 0) -> str:
    return f"{spread.median:.{digits}f} [{spread.min:.{digits}f}, {spread.max:.{digits}f}]"


def _median(key: str, digits: int = 0, scale: float = 1.0) -> Callable[[dict], str]:
    return lambda level: f"{level[key].median * scale:.{digits}f}"


# The columns of the results table: (header, formatter of one level's summary).
RESULT_COLUMNS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("req/s", lambda level: fmt_spread(level["requests_per_s"])),
    ("p50 ms", _median("latency_p50_ms", 2)),
    ("p95 ms", _median("latency_p95_ms", 2)),
    ("p99 ms", _median("latency_p99_ms", 2)),
    ("server CPU µs/req", lambda level: fmt_spread(level["server_cpu_us_per_request"])),
    ("overhead µs/req", lambda level: f"{level['server_overhead_us_per_request']:.0f}"),
    ("server core busy %", _median("server_core_busy", scale=100)),
    ("client CPU µs/req", _median("client_cpu_us_per_request")),
    ("server RSS MiB", _median("server_rss_mib")),
    ("errors", lambda level: str(level["errors"])),
)
BREAKDOWN_COLUMNS: tuple[tuple[str, Callable[[dict], str]], ...] = (
    ("context switches/req", _median("server_context_switches_per_request", 1)),
    ("ModelStatistics request µs", _median("server_request_us")),
    ("ModelStatistics compute µs", _median("server_compute_us")),
)
RUN_COLUMNS: tuple[tuple[str, Callable[[LevelRun], str]], ...] = (
    ("round", lambda run: str(run.round)),
    ("concurrency", lambda run: str(run.concurrency)),
    ("protocol", lambda run: run.protocol),
    ("requests", lambda run: str(run.requests)),
    ("s", lambda run: f"{run.wall_s:.1f}"),
    ("req/s", lambda run: f"{run.requests_per_s:.0f}"),
    ("p50 ms", lambda run: f"{run.latency_ms.p50:.2f}"),
    ("p99 ms", lambda run: f"{run.latency_ms.p99:.2f}"),
    ("server CPU µs/req", lambda run: f"{run.server_cpu_us_per_request:.0f}"),
)


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1
) -> list[str]:
    """A Markdown table, the first `left` columns left-aligned, the others right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _level_table(
    protocols: dict[str, dict], columns: Sequence[tuple[str, Callable[[dict], str]]]
) -> list[str]:
    """One row per concurrency level and protocol, the protocols of a level together."""
    rows = sorted(
        (int(c), PROTOCOLS.index(protocol), protocol, level)
        for protocol, summary in protocols.items()
        for c, level in summary["levels"].items()
    )
    return markdown_table(
        ("concurrency", "protocol", *(header for header, _ in columns)),
        ((c, protocol, *(cell(level) for _, cell in columns)) for c, _, protocol, level in rows),
        left=2,
    )


# The side-by-side table: (header, figure in a level's summary, digits, with the
# stream/unary ratio from summarize()).
COMPARED = (
    ("CPU µs/req", "server_cpu_us_per_request", 0, True),
    ("req/s", "requests_per_s", 0, True),
    ("p50 ms", "latency_p50_ms", 2, False),
    ("p99 ms", "latency_p99_ms", 2, False),
)


def _comparison_table(summary: dict) -> list[str]:
    """Unary and stream side by side per level, with the ratios paired within rounds."""
    unary, stream = (summary["protocols"][p]["levels"] for p in ("unary", "stream"))
    header = ["concurrency"]
    for title, _, _, ratio in COMPARED:
        header += [f"{title} unary", f"{title} stream"]
        header += [f"{title.split()[0]} stream/unary"] if ratio else []
    rows = []
    for c, ratios in summary["stream_vs_unary"].items():
        row = [c]
        for _, key, digits, ratio in COMPARED:
            row += [f"{level[key].median:.{digits}f}" for level in (unary[c], stream[c])]
            row += [fmt_spread(ratios[key], 2)] if ratio else []
        rows.append(row)
    return markdown_table(header, rows)


def _levels_meeting(protocol: dict) -> list[str]:
    """The levels where a protocol meets the target, only where it misses it elsewhere."""
    met = [c for c, level in protocol["levels"].items() if level["target_met"]]
    return met if len(met) < len(protocol["levels"]) else []


def render_markdown(report: dict) -> str:
    """The Markdown report: verdict, results, where the CPU goes, reference points, every
    run, setup and machine."""
    env, setup, summary = report["environment"], report["setup"], report["summary"]
    protocols: dict[str, dict] = summary["protocols"]
    ort = summary["onnxruntime"]
    verdicts = "; ".join(
        f"{protocol} {'MET' if p['target_met'] else 'NOT MET'} (worst level: median "
        f"{p['worst_server_cpu_us_per_request']:.0f} µs at concurrency {p['worst_concurrency']}"
        + (f"; met at concurrency {', '.join(met)}" if (met := _levels_meeting(p)) else "")
        + ")"
        for protocol, p in protocols.items()
    )
    groups = sorted(
        {
            g
            for p in protocols.values()
            for level in p["levels"].values()
            for g in level["server_cpu_us_by_thread"]
        }
    )
    by_thread = [
        (
            f"{group} µs/req",
            lambda level, g=group: (
                f"{level['server_cpu_us_by_thread'][g].median:.0f}"
                if g in level["server_cpu_us_by_thread"]
                else "0"
            ),
        )
        for group in groups
    ]
    lines = [
        f"# Server overhead: {MODEL_NAME}, batch {BATCH}",
        "",
        f"**Target ≤ {TARGET_US:.0f} µs server CPU per request: {verdicts}.**",
        "",
        f"Medians over {setup['rounds']} rounds, [min, max] in brackets. Server CPU per request "
        "= utime+stime of the server process (all threads) over a level / requests completed; "
        "overhead = that minus onnxruntime alone, hot "
        f"({ort['hot']['cpu_us_per_run'].median:.1f} µs CPU per run). unary: `concurrency` "
        "ModelInfer calls in flight; stream: `concurrency` requests in flight on one "
        "ModelStreamInfer stream.",
        "",
        *(
            [
                "Side by side (medians; stream/unary: the ratio within each round, where the "
                "two ran back to back, median [min, max] over rounds):",
                "",
                *_comparison_table(summary),
                "",
                "All figures:",
                "",
            ]
            if summary["stream_vs_unary"]
            else []
        ),
        *_level_table(protocols, RESULT_COLUMNS),
        "",
        f"Server peak RSS over the whole run: {report['server_peak_rss_mib']:.0f} MiB.",
        "",
        "## Where the server's CPU goes",
        "",
        "Server CPU per request by thread (event loop: gRPC's Python layer, decode, DataPlane, "
        "encode, and `session.run` itself when the run is short enough to run inline; gRPC "
        "core: its C event-engine threads, socket I/O; other threads: the inference pool "
        "running longer `session.run`s, gRPC's asyncio poller, metrics HTTP), context "
        "switches per request (all threads), and the server's own ModelStatistics per "
        "request in µs of wall time: decoded request to result, and of that the backend call "
        "(`session.run`, plus the thread-pool hop when not inline).",
        "",
        *_level_table(protocols, [*by_thread, *BREAKDOWN_COLUMNS]),
        "",
        f"onnxruntime alone on the server's core, {setup['intra_op_threads']} intra-op thread "
        f"(hot: back to back; cold: {setup['flush_mib']} MiB written between runs, untimed, as "
        "request handling does between two runs in the server):",
        "",
        *markdown_table(
            ("caches", "CPU µs/run", "p50 wall µs"),
            (
                (caches, fmt_spread(o["cpu_us_per_run"], 1), fmt_spread(o["wall_us_p50"], 1))
                for caches, o in ort.items()
            ),
        ),
        "",
        "## Reference points",
        "",
        "Server CPU per batch-1 request as quoted in the issue (measured elsewhere, not by this "
        "benchmark):",
        "",
        *markdown_table(
            ("server", "µs/request"),
            [
                *((name, f"{us:.0f}") for name, us in REFERENCES_US.items()),
                ("**target for sparseserve**", f"**≤ {TARGET_US:.0f}**"),
            ],
        ),
        "",
        "## Every run",
        "",
        *markdown_table(
            [header for header, _ in RUN_COLUMNS],
            ([cell(run) for _, cell in RUN_COLUMNS] for run in report["level_runs"]),
        ),
        "",
        "## Setup",
        "",
        f"- model: {MODEL_NAME} {'→'.join(map(str, MODEL_SIZES))} FP32, batch {BATCH}",
        f"- server: `sparseserve serve {shlex.join(setup['server_args'])}`, pinned to CPU "
        f"{setup['server_cpu']}; Prometheus metrics "
        f"{'off' if setup['no_metrics'] else 'on (as in production)'}; dynamic batching "
        + (
            f"on (config.pbtxt `{' '.join(BATCHING_PBTXT.split())}`)"
            if setup.get("batching")
            else "off"
        ),
        f"- client: tritonclient.grpc.aio in the benchmark process, pinned to CPU "
        f"{setup['client_cpu']}; {setup['distinct_inputs']} pre-generated random inputs; "
        "answers checked against onnxruntime first",
        f"- protocols: {', '.join(setup['protocol'])}, each level of each protocol measured "
        "alone, the protocols of a level back to back",
        f"- per level: {setup['warmup']} warm-up requests, then up to {setup['requests']} "
        f"requests or {setup['max_seconds']} s; levels (and protocols within a level) in "
        "rotated order each round",
        f"- onnxruntime alone: {setup['ort_runs']} hot and {setup['ort_cold_runs']} cold runs "
        f"per round, same model file, on CPU {setup['server_cpu']}",
        "",
        "## Machine",
        "",
        *machine_lines(env),
        "",
    ]
    return "\n".join(lines)


def machine_lines(env: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The Markdown bullets saying where, with what and how a result was measured
    (`extra` bullets go after the versions)."""
    changed = env["git"]["changed_paths"]
    return [
        f"- {env['timestamp']} on `{env['hostname']}`: {env['cpu_model']}, "
        f"{env['cpu_count']} cores, {env['platform']}",
        f"- Python {env['python']}; "
        + ", ".join(f"{name} {version}" for name, version in env["packages"].items()),
        *extra,
        f"- git {env['git']['commit']}"
        + (f", uncommitted changes in: {', '.join(changed)}" if env["git"]["dirty"] else ""),
        f"- command: `{env['command']}`",
    ]


def write_results(output_dir: Path, name: str, report: dict, markdown: str) -> None:
    """Write `<name>.json` (every number; dataclasses as dicts) and `<name>.md` into
    `output_dir`, and print the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=asdict) + "\n")
    (output_dir / f"{name}.md").write_text(markdown)
    print(markdown)


# -- entry point -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--protocol",
        type=_protocols,
        default=",".join(PROTOCOLS),  # argparse converts it with `type`
        metavar=",".join(PROTOCOLS),
        help="comma-separated: unary (ModelInfer calls) and/or stream (one ModelStreamInfer "
        "stream per level); with both, they are interleaved within each round",
    )
    parser.add_argument("--rounds", type=int, default=3, help="repeat every level this often")
    parser.add_argument("--warmup", type=int, default=200, help="requests before each level")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per level")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="most time per level")
    parser.add_argument("--ort-runs", type=int, default=5000, help="hot onnxruntime runs/round")
    parser.add_argument("--ort-cold-runs", type=int, default=500, help="cold runs per round")
    parser.add_argument(
        "--flush-mib", type=int, default=8, help="MiB written between cold onnxruntime runs"
    )
    parser.add_argument("--distinct-inputs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=0, help="core the server runs on")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the client runs on")
    parser.add_argument("--inference-threads", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument(
        "--no-metrics", action="store_true", help="serve without Prometheus metrics"
    )
    parser.add_argument(
        "--batching",
        action="store_true",
        help="serve mlp_small with dynamic batching (config.pbtxt as in bench/batching.py)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="where to write"
    )
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.requests < 1:
        parser.error("--concurrency, --rounds and --requests must be at least 1")
    available = os.sched_getaffinity(0)
    for option in ("server_cpu", "client_cpu"):
        if getattr(args, option) not in available:
            parser.error(f"--{option.replace('_', '-')} must be one of {sorted(available)}")
    return args


def _protocols(text: str) -> list[str]:
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    if not protocols or len(set(protocols)) != len(protocols) or set(protocols) - set(PROTOCOLS):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(PROTOCOLS)}, got {text!r}"
        )
    return protocols


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Before the gRPC client starts its threads, so that they inherit the pinning.
    pin_thread(args.client_cpu)
    extra = server_args(args)
    with tempfile.TemporaryDirectory(prefix="sparseserve-bench-") as tmp:
        model = build_repository(Path(tmp), BATCHING_PBTXT if args.batching else None)
        with ServerProcess(Path(tmp), *extra, cpu=args.server_cpu) as server:
            try:
                ort_runs, level_runs, peak_rss = asyncio.run(run_rounds(args, model, server))
            except BenchmarkError as exc:
                raise SystemExit(
                    f"server_overhead: {exc}\n--- server log ---\n{server.log()}"
                ) from exc
        if server.returncode != 0:
            raise SystemExit(f"server exited with {server.returncode}:\n{server.log()}")

    setup = {key: value for key, value in vars(args).items() if key != "output_dir"}
    report = {
        "benchmark": "server_overhead",
        "model": {"name": MODEL_NAME, "sizes": list(MODEL_SIZES), "batch": BATCH},
        "environment": environment(),
        "setup": {**setup, "server_args": extra},
        "references_us": REFERENCES_US,
        "summary": summarize(ort_runs, level_runs),
        "server_peak_rss_mib": peak_rss / MiB,
        "onnxruntime_runs": ort_runs,
        "level_runs": level_runs,
    }
    write_results(args.output_dir, "server_overhead", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
