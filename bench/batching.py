"""Dynamic batching on vs off, interleaved in one run against one server.

The repository holds each model twice: `<model>` (no config.pbtxt: requests run one by
one) and `<model>_batched` (the same file, with a config.pbtxt enabling dynamic
batching). Each round runs every level (model, concurrency) against both, in an order
that alternates between rounds, so that drift on this shared machine hits both arms
alike. Per level: client req/s and latency, server CPU per request (from /proc, all
threads) and the average batch size (inferences / executions from ModelStatistics).

Writes bench/results/batching.json (every number, machine, versions, command) and
bench/results/batching.md. The shared parts come from bench/report.py, measure.py and workload.py.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
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
    write_results,
)
from bench.workload import triton_inputs
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

MODELS = {"mlp_small": (64, 256, 256, 10), "mlp_large": (1024, 4096, 4096, 1000)}
# (model, concurrency) levels, as the issue asks.
LEVELS = (("mlp_small", 1), ("mlp_small", 8), ("mlp_small", 32), ("mlp_large", 32))
ARMS = ("off", "on")
TARGETS = {
    "mlp_large c=32 batching: ≥ 700 req/s": lambda s: (
        s["mlp_large@32"]["on"]["requests_per_s"] >= 700
    ),
    "mlp_large c=32 batching: p99 ≤ 100 ms": lambda s: (
        s["mlp_large@32"]["on"]["latency_p99_ms"] <= 100
    ),
    # Within noise: the median over rounds of on/off, each round's arms back to back.
    "mlp_small c=1: batching on not slower than off (on/off req/s ≥ 0.97)": lambda s: (
        s["mlp_small@1"]["on_vs_off"]["requests_per_s"].median >= 0.97
    ),
    "mlp_small (every level, batching on): server CPU ≤ 200 µs/request": lambda s: all(
        s[f"mlp_small@{c}"]["on"]["server_cpu_us_per_request"] <= 200 for c in (1, 8, 32)
    ),
}


@dataclass(frozen=True, slots=True)
class ArmRun:
    """One level, one arm, one round."""

    round: int
    model: str
    concurrency: int
    batching: str
    requests: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float
    average_batch_requests: float  # requests per execution (rows: the same, batch 1)


def config_pbtxt(args: argparse.Namespace) -> str:
    return (
        f"max_batch_size: {args.max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {args.max_queue_delay_us} }}\n"
        f"instance_group [{{ count: {args.instances} kind: KIND_CPU }}]\n"
    )


def build_repository(root: Path, args: argparse.Namespace) -> None:
    for name, sizes in MODELS.items():
        path = onnx_models.mlp(root / name / "1" / "model.onnx", sizes=sizes)
        batched = root / f"{name}_batched"
        (batched / "1").mkdir(parents=True)
        (batched / "1" / "model.onnx").symlink_to(path)
        (batched / "config.pbtxt").write_text(config_pbtxt(args))


async def counts(client: triton_aio.InferenceServerClient, model: str) -> tuple[int, int]:
    (stats,) = (await client.get_inference_statistics(model)).model_stats
    return stats.inference_count, stats.execution_count


async def measure(
    client: triton_aio.InferenceServerClient,
    pid: int,
    requests: Sequence[Any],
    model: str,
    concurrency: int,
    batching: str,
    args: argparse.Namespace,
    round_index: int,
) -> ArmRun:
    served = model if batching == "off" else f"{model}_batched"
    _, errors = await drive_unary(client, requests, concurrency, args.warmup, 30, model=served)
    check_errors(errors, args.warmup, f"warm-up of {served} at concurrency {concurrency}")
    before, server_before = await counts(client, served), ProcessSample.read(pid)
    started = time.perf_counter()
    latencies, errors = await drive_unary(
        client, requests, concurrency, args.requests, args.max_seconds, model=served
    )
    wall = time.perf_counter() - started
    server_after, after = ProcessSample.read(pid), await counts(client, served)
    check_errors(errors, len(latencies) + len(errors), f"{served} at concurrency {concurrency}")
    if not latencies:
        raise BenchmarkError(f"no request to {served} completed")
    inferences, executions = (a - b for a, b in zip(after, before, strict=True))
    cpu_s = (server_after.cpu_ticks - server_before.cpu_ticks) / CLOCK_TICKS
    return ArmRun(
        round=round_index,
        model=model,
        concurrency=concurrency,
        batching=batching,
        requests=len(latencies),
        wall_s=wall,
        requests_per_s=len(latencies) / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_us_per_request=cpu_s / len(latencies) * 1e6,
        average_batch_requests=inferences / max(1, executions),
    )


async def check_same_answers(
    client: triton_aio.InferenceServerClient, requests: dict[str, Sequence[Any]]
) -> None:
    """Batched and unbatched must answer the same, bit for bit, or the timings mean
    nothing: send concurrent requests to both and compare."""
    for model, inputs in requests.items():
        plain = await asyncio.gather(*(client.infer(model, r) for r in inputs[:16]))
        batched = await asyncio.gather(*(client.infer(f"{model}_batched", r) for r in inputs[:16]))
        for a, b in zip(plain, batched, strict=True):
            if not np.array_equal(a.as_numpy("output"), b.as_numpy("output")):
                raise BenchmarkError(f"{model}: batched answers differ from unbatched ones")


async def run_rounds(args: argparse.Namespace, server: ServerProcess) -> list[ArmRun]:
    rng = np.random.default_rng(args.seed)
    requests = {
        name: triton_inputs(
            [rng.standard_normal((1, sizes[0])).astype(np.float32) for _ in range(64)]
        )
        for name, sizes in MODELS.items()
    }
    runs: list[ArmRun] = []
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        await check_same_answers(client, requests)
        for round_index in range(args.rounds):
            for model, concurrency in args.levels:
                arms = ARMS if round_index % 2 == 0 else ARMS[::-1]
                for batching in arms:
                    run = await measure(
                        client, server.pid, requests[model], model, concurrency, batching,
                        args, round_index,
                    )  # fmt: skip
                    runs.append(run)
                    progress(
                        f"round {round_index}: {model} c={concurrency:<3} batching {batching:3} "
                        f"{run.requests_per_s:7.0f} req/s  p99 {run.latency_ms.p99:7.2f} ms  "
                        f"CPU {run.server_cpu_us_per_request:5.0f} µs/req  "
                        f"batch {run.average_batch_requests:5.2f}"
                    )
    return runs


def summarize(runs: Sequence[ArmRun], levels: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Per level and arm, the median over rounds (Spread: median, min, max)."""
    summary: dict[str, Any] = {}
    for model, concurrency in levels:
        level = summary[f"{model}@{concurrency}"] = {}
        for batching in ARMS:
            mine = [
                r
                for r in runs
                if (r.model, r.concurrency, r.batching) == (model, concurrency, batching)
            ]
            level[batching] = {
                "requests_per_s": statistics.median(r.requests_per_s for r in mine),
                "requests_per_s_spread": Spread.of([r.requests_per_s for r in mine]),
                "latency_p50_ms": statistics.median(r.latency_ms.p50 for r in mine),
                "latency_p99_ms": statistics.median(r.latency_ms.p99 for r in mine),
                "server_cpu_us_per_request": statistics.median(
                    r.server_cpu_us_per_request for r in mine
                ),
                "average_batch_requests": statistics.median(r.average_batch_requests for r in mine),
            }
        # Paired within each round (the two arms ran back to back): on / off.
        by_round = {
            (r.round, r.batching): r
            for r in runs
            if (r.model, r.concurrency) == (model, concurrency)
        }
        rounds = sorted({index for index, _ in by_round})
        level["on_vs_off"] = {
            "requests_per_s": Spread.of(
                [
                    _ratio(by_round[i, "on"].requests_per_s, by_round[i, "off"].requests_per_s)
                    for i in rounds
                ]
            ),
            "server_cpu_us_per_request": Spread.of(
                [
                    _ratio(
                        by_round[i, "on"].server_cpu_us_per_request,
                        by_round[i, "off"].server_cpu_us_per_request,
                    )
                    for i in rounds
                ]
            ),
        }
    return summary


def _ratio(on: float, off: float) -> float:
    """on / off; NaN where `off` measured nothing (a level too short for one clock tick)."""
    return on / off if off else math.nan


def targets(summary: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: met, not met, or None when a level it needs was not run."""
    met: dict[str, bool | None] = {}
    for name, check in TARGETS.items():
        try:
            met[name] = bool(check(summary))
        except KeyError:
            met[name] = None
    return met


def parse_levels(text: str) -> list[tuple[str, int]]:
    """`mlp_small@1,mlp_large@32` -> [("mlp_small", 1), ("mlp_large", 32)]."""
    levels = []
    for item in filter(None, text.split(",")):
        model, _, concurrency = item.partition("@")
        if model not in MODELS or not concurrency.isdigit() or int(concurrency) < 1:
            raise argparse.ArgumentTypeError(
                f"bad level {item!r}: expected MODEL@CONCURRENCY with MODEL one of "
                f"{', '.join(MODELS)}"
            )
        levels.append((model, int(concurrency)))
    return levels


def render_markdown(report: dict[str, Any]) -> str:
    summary, env, setup = report["summary"], report["environment"], report["setup"]
    models = ", ".join(f"{n} {'→'.join(map(str, s))} FP32" for n, s in MODELS.items())
    rows = []
    for key, level in summary.items():
        model, _, concurrency = key.partition("@")
        for batching in ARMS:
            arm = level[batching]
            rows.append(
                (
                    model, concurrency, batching, fmt_spread(arm["requests_per_s_spread"]),
                    f"{arm['latency_p50_ms']:.2f}", f"{arm['latency_p99_ms']:.2f}",
                    f"{arm['server_cpu_us_per_request']:.0f}",
                    f"{arm['average_batch_requests']:.2f}",
                )
            )  # fmt: skip
    lines = [
        "# Dynamic batching: on vs off",
        "",
        f"Medians over {setup['rounds']} interleaved rounds; req/s as median [min, max]. "
        "Server CPU per request: utime+stime of the server process (all threads) over a "
        "level / requests. Batch: requests per backend execution (inferences / executions "
        "from ModelStatistics; every request is 1 row).",
        "",
        *markdown_table(
            (
                "model",
                "concurrency",
                "batching",
                "req/s",
                "p50 ms",
                "p99 ms",
                "server CPU µs/req",
                "batch",
            ),
            rows,
        ),
        "",
        "Batching on / off within each round (the two arms ran back to back), median "
        "[min, max] over rounds:",
        "",
        *markdown_table(
            ("model", "concurrency", "req/s on/off", "server CPU on/off"),
            (
                (
                    *key.split("@"),
                    fmt_spread(level["on_vs_off"]["requests_per_s"], 3),
                    fmt_spread(level["on_vs_off"]["server_cpu_us_per_request"], 3),
                )
                for key, level in summary.items()
            ),
        ),
        "",
        "## Targets from the issue",
        "",
        *markdown_table(
            ("target", "met"),
            (
                (target, "not run" if met is None else "yes" if met else "**no**")
                for target, met in report["targets"].items()
            ),
        ),
        "",
        "## Setup",
        "",
        f"- models: {models}, batch-1 requests from 64 pre-generated random inputs",
        f"- batching on: the same model file with config.pbtxt `{setup['config_pbtxt']}`",
        f"- server: `sparseserve serve {shlex.join(setup['server_args'])}` on "
        f"{_cores(setup['server_cpu'])}; client: tritonclient.grpc.aio in the benchmark "
        f"process, on {_cores(setup['client_cpu'])}",
        f"- per level and arm: {setup['warmup']} warm-up requests, then up to "
        f"{setup['requests']} requests or {setup['max_seconds']} s; arms alternate order "
        "between rounds; batched and unbatched answers checked equal first",
        "",
        "## Machine",
        "",
        *machine_lines(env),
        "",
    ]
    return "\n".join(lines)


def _cores(cpu: int | None) -> str:
    return "every core (not pinned)" if cpu is None else f"core {cpu} (pinned)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--levels",
        type=parse_levels,
        default=list(LEVELS),
        help="comma-separated MODEL@CONCURRENCY levels (default: all four of the issue)",
    )
    parser.add_argument("--warmup", type=int, default=100, help="requests before each arm")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per arm")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="most time per arm")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="batches of one model running at once (config.pbtxt instance_group count); "
        "pinned to one core, a second one only takes turns with the first",
    )
    parser.add_argument("--inference-threads", type=int, default=0, help="0: the server's default")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument(
        "--server-cpu",
        type=int,
        default=0,
        help="core the server runs on (the issue's method); -1: every core",
    )
    parser.add_argument(
        "--client-cpu", type=int, default=1, help="core the load client runs on; -1: every core"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.server_cpu = None if args.server_cpu < 0 else args.server_cpu
    args.client_cpu = None if args.client_cpu < 0 else args.client_cpu
    server_args = [
        *(["--inference-threads", str(args.inference_threads)] if args.inference_threads else []),
        "--intra-op-threads", str(args.intra_op_threads),
        "--log-level", "WARNING",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sparseserve-bench-") as tmp:
        build_repository(Path(tmp), args)
        pin_thread(args.client_cpu)
        with ServerProcess(Path(tmp), *server_args, cpu=args.server_cpu) as server:
            try:
                runs = asyncio.run(run_rounds(args, server))
            except BenchmarkError as exc:
                raise SystemExit(f"batching: {exc}\n--- server log ---\n{server.log()}") from exc
    summary = summarize(runs, args.levels)
    setup = {k: v for k, v in vars(args).items() if k != "output_dir"}
    report = {
        "benchmark": "batching",
        "environment": environment(),
        "setup": {
            **setup,
            "server_args": server_args,
            "config_pbtxt": " ".join(config_pbtxt(args).split()),
        },
        "summary": summary,
        "targets": targets(summary),
        "runs": runs,
    }
    write_results(args.output_dir, "batching", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
