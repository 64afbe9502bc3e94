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
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import (
    CLOCK_TICKS,
    Answers,
    BenchmarkError,
    LatencySummary,
    Load,
    MiB,
    OnnxRuntimeRun,
    ProcessSample,
    check_errors,
    drive_stream,
    drive_unary,
    measure_onnxruntime,
    per_thread_group,
    pin_thread,
)
from bench.report import (
    REPO_ROOT,
    Spread,
    environment,
    fmt_spread,
    machine_lines,
    markdown_table,
    progress,
    rotated,
    write_results,
)
from bench.workload import (
    BATCH,
    BATCHING_PBTXT,
    INPUT_NAME,
    MODEL_NAME,
    MODEL_SIZES,
    OUTPUT_NAME,
    build_repository,
    onnxruntime_session,
    random_inputs,
    triton_inputs,
)
from sparseserve.client.server_process import ServerProcess

PROTOCOLS = ("unary", "stream")

# Reference points quoted in the issue (server CPU per batch-1 request, measured
# elsewhere, not by this script).
REFERENCES_US = {
    "KServe 0.21": 520.0,
    "MLServer 1.7": 680.0,
    "onnxruntime alone": 10.0,
}
TARGET_US = 250.0


# -- measurements ----------------------------------------------------------------------


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


# -- setup -----------------------------------------------------------------------------


# -- onnxruntime alone -----------------------------------------------------------------


# -- the server under load ---------------------------------------------------------------


LoadLoop = Callable[..., Awaitable[Load]]
LOAD_LOOPS: dict[str, LoadLoop] = {"unary": drive_unary, "stream": drive_stream}


async def model_statistics(client: triton_aio.InferenceServerClient) -> tuple[int, int, int]:
    """(successful requests, their total ns, total compute ns) from ModelStatistics."""
    stats = (await client.get_inference_statistics(MODEL_NAME)).model_stats[0].inference_stats
    return stats.success.count, stats.success.ns, stats.compute_infer.ns


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
