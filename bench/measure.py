"""How the benchmarks measure: CPU time, memory and context switches of a process (and
its threads, and its process tree) from /proc; tritonclient load loops that time each
request (unary calls, or one stream); onnxruntime alone on a pinned core; latency
percentiles. A failed request raises BenchmarkError: numbers with errors are not kept."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferResult
from tritonclient.utils import InferenceServerException

from bench.workload import INPUT_NAME, MODEL_NAME, OUTPUT_NAME

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """The benchmark could not produce trustworthy numbers (e.g. a request failed)."""


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


def pin_thread(cpu: int | None) -> set[int]:
    """Pin the calling thread (and threads it starts later) to `cpu`; return the old set."""
    previous = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return previous


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


def check_errors(errors: Sequence[str], total: int, what: str) -> None:
    """Raise BenchmarkError if any of the `total` requests of `what` failed."""
    if errors:
        raise BenchmarkError(
            f"{len(errors)} of {total} requests failed during {what}; first error: {errors[0]}"
        )


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (MLServer may fork inference workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime+stime of every thread of every process in the tree, processes counted)."""
    total, count = 0, 0
    for member in process_tree(pid):
        try:
            total += ProcessSample.read(member).cpu_ticks
            count += 1
        except OSError:  # ended meanwhile
            continue
    return total, count


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The server's `sparseserve_*` samples with labels, from its /metrics at `url`: one
    (metric name, labels, value) per line."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("sparseserve_") and "{" in line:
            name, _, rest = line.partition("{")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            samples.append((name, labels, float(line.rsplit(" ", 1)[1])))
    return samples
