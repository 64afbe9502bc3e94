"""This checkout's serving path against another commit's, alternating, in one run.

For a change to the request path the question is whether it costs anything per
request. This starts `sparseserve serve` twice, from this checkout and from
`--baseline` (that commit's `service/` tree, exported with `git archive` into a
temporary folder and put first on the server's PYTHONPATH; the same venv), each pinned
to `--server-cpu` with the load generator on `--client-cpu`, and measures two
workloads on each, in every round, the order of the two servers swapped each round:

- `small`: mlp_small (64->256->256->10, FP32), batch-1 unary requests at c=8, no
  batching: nearly all of the cost is the server's own (server_overhead.py's setting);
- `large-batched`: mlp_large (1024->4096->4096->1000, FP32), batch-1 unary requests at
  c=32 with dynamic batching (bench/workload.py's BATCHING_PBTXT).

Per workload and server: req/s, p50/p99 latency and the server's CPU per request
(utime+stime of the whole process from /proc). The ratio this/baseline is taken within
each round (where the two ran back to back) and the median over rounds is reported.

Writes bench/results/versus_commit.{json,md}. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput

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
    rotated,
    write_results,
)
from bench.workload import BATCHING_PBTXT, INPUT_NAME, OUTPUT_NAME, SERVER_ARGS
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    model: str
    sizes: tuple[int, ...]
    concurrency: int
    batching: bool


WORKLOADS = (
    Workload("small", "mlp_small", (64, 256, 256, 10), concurrency=8, batching=False),
    Workload("large-batched", "mlp_large", (1024, 4096, 4096, 1000), concurrency=32, batching=True),
)
ARMS = ("this", "baseline")


@dataclass(frozen=True, slots=True)
class Run:
    """One workload on one server in one round."""

    round: int
    arm: str  # "this" or "baseline"
    workload: str
    requests: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float
    mean_batch_rows: float  # requests / model executions, from the server's ModelStatistics


def build_repository(root: Path) -> None:
    """Both models, mlp_large with dynamic batching."""
    for workload in WORKLOADS:
        if workload.batching:
            (root / workload.model).mkdir(parents=True, exist_ok=True)
            (root / workload.model / "config.pbtxt").write_text(BATCHING_PBTXT)
        onnx_models.mlp(root / workload.model / "1" / "model.onnx", sizes=workload.sizes)


def export_service(ref: str, destination: Path) -> str:
    """Write `ref`'s service/ tree under `destination`; returns the full commit id."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit, "service"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        text = stderr.decode() if isinstance(stderr, bytes) else stderr
        raise SystemExit(f"versus_commit: cannot export {ref!r} from git: {text or exc}") from exc
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return commit


def imported_from(env: dict[str, str]) -> str:
    """Where `python -m sparseserve` would import the package from, with `env`."""
    return subprocess.run(
        [sys.executable, "-c", "import sparseserve; print(sparseserve.__file__)"],
        check=True, capture_output=True, text=True, env={**os.environ, **env},
    ).stdout.strip()  # fmt: skip


def requests_for(workload: Workload, count: int, seed: int) -> list[list[InferInput]]:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        tensor = InferInput(INPUT_NAME, [1, workload.sizes[0]], "FP32")
        tensor.set_data_from_numpy(rng.standard_normal((1, workload.sizes[0])).astype(np.float32))
        requests.append([tensor])
    return requests


async def check_same_answers(
    clients: dict[str, triton_aio.InferenceServerClient],
    requests: dict[str, list[list[InferInput]]],
) -> None:
    """Both servers answer the same inputs alike before anything is timed."""
    for workload in WORKLOADS:
        answers = {}
        for arm, client in clients.items():
            result = await client.infer(workload.model, requests[workload.name][0])
            answers[arm] = result.as_numpy(OUTPUT_NAME)
        if not np.allclose(answers["this"], answers["baseline"], rtol=1e-5, atol=1e-6):
            raise BenchmarkError(f"{workload.model}: the two servers answer differently")


async def measure(
    client: triton_aio.InferenceServerClient,
    pid: int,
    workload: Workload,
    requests: list[list[InferInput]],
    args: argparse.Namespace,
    round_index: int,
    arm: str,
) -> Run:
    what = f"round {round_index}, {arm}, {workload.name}"
    _, errors = await drive_unary(
        client, requests, workload.concurrency, args.warmup, args.max_seconds, model=workload.model
    )
    check_errors(errors, args.warmup, f"warm-up, {what}")
    executions_before = await execution_count(client, workload.model)
    before = ProcessSample.read(pid)
    started = time.perf_counter()
    latencies, errors = await drive_unary(
        client, requests, workload.concurrency, args.requests, args.max_seconds,
        model=workload.model,
    )  # fmt: skip
    wall = time.perf_counter() - started
    after = ProcessSample.read(pid)
    executions = await execution_count(client, workload.model) - executions_before
    check_errors(errors, len(latencies) + len(errors), what)
    if not latencies:
        raise BenchmarkError(f"no request completed, {what}")
    done = len(latencies)
    cpu_s = (after.cpu_ticks - before.cpu_ticks) / CLOCK_TICKS
    return Run(
        round=round_index,
        arm=arm,
        workload=workload.name,
        requests=done,
        wall_s=wall,
        requests_per_s=done / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_us_per_request=cpu_s / done * 1e6,
        mean_batch_rows=done / max(executions, 1),
    )


async def execution_count(client: triton_aio.InferenceServerClient, model: str) -> int:
    """How many times the server has run `model` (a batch counts once)."""
    return int((await client.get_inference_statistics(model)).model_stats[0].execution_count)


async def run_rounds(servers: dict[str, ServerProcess], args: argparse.Namespace) -> list[Run]:
    requests = {w.name: requests_for(w, args.distinct_inputs, args.seed) for w in WORKLOADS}
    runs: list[Run] = []
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            arm: await stack.enter_async_context(triton_aio.InferenceServerClient(s.grpc_url))
            for arm, s in servers.items()
        }
        await check_same_answers(clients, requests)
        for round_index in range(args.rounds):
            for workload in rotated(WORKLOADS, round_index):
                for arm in rotated(ARMS, round_index):
                    run = await measure(
                        clients[arm], servers[arm].pid, workload, requests[workload.name],
                        args, round_index, arm,
                    )  # fmt: skip
                    runs.append(run)
                    progress(
                        f"round {round_index}: {workload.name:<13} {arm:<8} "
                        f"{run.requests_per_s:7.0f} req/s  p50 {run.latency_ms.p50:6.2f} ms  "
                        f"server CPU {run.server_cpu_us_per_request:6.0f} µs/req"
                    )
    return runs


def summarize(runs: Sequence[Run]) -> dict[str, dict[str, object]]:
    """Per workload: each arm's spread over rounds, and the within-round ratios."""
    summary: dict[str, dict[str, object]] = {}
    for workload in WORKLOADS:
        mine = [r for r in runs if r.workload == workload.name]
        by_round = {(r.round, r.arm): r for r in mine}
        rounds = sorted({r.round for r in mine})
        entry: dict[str, object] = {}
        for arm in ARMS:
            arm_runs = [r for r in mine if r.arm == arm]
            entry[arm] = {
                "requests_per_s": Spread.of([r.requests_per_s for r in arm_runs]),
                "server_cpu_us_per_request": Spread.of(
                    [r.server_cpu_us_per_request for r in arm_runs]
                ),
                "p50_ms": statistics.median(r.latency_ms.p50 for r in arm_runs),
                "p99_ms": statistics.median(r.latency_ms.p99 for r in arm_runs),
                "mean_batch_rows": statistics.median(r.mean_batch_rows for r in arm_runs),
            }
        entry["ratio"] = {
            key: Spread.of(
                [
                    getattr(by_round[(i, "this")], key) / getattr(by_round[(i, "baseline")], key)
                    for i in rounds
                ]
            )
            for key in ("requests_per_s", "server_cpu_us_per_request")
        }
        summary[workload.name] = entry
    return summary


def render_markdown(report: dict) -> str:
    env = report["environment"]
    setup = report["setup"]
    lines = [
        "# This checkout against another commit: the serving path's cost per request",
        "",
        (
            f"`this` = {setup['candidate']} ({report['candidate_commit'][:12]})"
            if report["candidate_commit"]
            else f"`this` = the working tree at {env['git']['commit']}"
            + (" (with uncommitted changes)" if env["git"]["dirty"] else "")
        )
        + f"; `baseline` = {setup['baseline']} ({report['baseline_commit'][:12]}).",
        f"Medians over {setup['rounds']} rounds ([min, max]); the two servers ran back to "
        "back within each round, in an order swapped every round. Ratios are this ÷ "
        "baseline within each round, median [min, max] over rounds: a CPU ratio above 1 "
        "or a req/s ratio below 1 means this checkout costs more.",
        "",
    ]
    rows = []
    for workload in WORKLOADS:
        entry = report["summary"][workload.name]
        label = f"{workload.model}, c={workload.concurrency}" + (
            ", dynamic batching" if workload.batching else ""
        )
        for arm in ARMS:
            figures = entry[arm]
            rows.append(
                (
                    label, arm,
                    fmt_spread(figures["requests_per_s"]),
                    f"{figures['p50_ms']:.2f}", f"{figures['p99_ms']:.2f}",
                    fmt_spread(figures["server_cpu_us_per_request"]),
                    f"{figures['mean_batch_rows']:.1f}",
                )
            )  # fmt: skip
        ratio = entry["ratio"]
        rows.append(
            (
                label, "**this ÷ baseline**",
                fmt_spread(ratio["requests_per_s"], 3), "", "",
                fmt_spread(ratio["server_cpu_us_per_request"], 3), "",
            )
        )  # fmt: skip
    header = (
        "workload",
        "server",
        "req/s",
        "p50 ms",
        "p99 ms",
        "server CPU µs/req",
        "rows per execution",
    )
    lines += markdown_table(header, rows, left=2)
    lines += [
        "",
        "## Machine and setup",
        "",
        *machine_lines(
            env,
            [
                f"- server: `sparseserve serve {' '.join(setup['server_args'])}` on CPU "
                f"{setup['server_cpu']}, load generator on CPU {setup['client_cpu']}; "
                f"{setup['warmup']} warm-up requests, then up to {setup['requests']} "
                f"requests or {setup['max_seconds']} s per measurement"
            ],
        ),
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def started_servers(
    repository: Path, services: dict[str, Path | None], args: argparse.Namespace
) -> Iterator[dict[str, ServerProcess]]:
    """One server per arm; an arm with a service/ folder imports sparseserve from it (the
    check below makes sure), one without from this checkout."""
    envs = {}
    for arm, service in services.items():
        if service is not None:
            envs[arm] = {"PYTHONPATH": str(service)}
            where = imported_from(envs[arm])
            if not where.startswith(str(service)):
                raise SystemExit(f"versus_commit: the {arm} server would import {where}")
    with contextlib.ExitStack() as stack:
        yield {
            arm: stack.enter_context(
                ServerProcess(repository, *SERVER_ARGS, cpu=args.server_cpu, env=envs.get(arm))
            )
            for arm in ARMS
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--baseline", default="HEAD~1", help="the git commit to compare with")
    parser.add_argument(
        "--candidate",
        default=None,
        help="measure this git commit instead of the checkout's working tree",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=200, help="requests before each measurement")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per measurement")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="most time per measurement")
    parser.add_argument("--distinct-inputs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=0, help="core both servers run on")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the client runs on")
    parser.add_argument(
        "--name", default="versus_commit", help="the results' file name, without extension"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="where to write"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--rounds and --requests must be at least 1, --warmup at least 0")
    available = os.sched_getaffinity(0)
    for option in ("server_cpu", "client_cpu"):
        if getattr(args, option) not in available:
            parser.error(f"--{option.replace('_', '-')} must be one of {sorted(available)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pin_thread(args.client_cpu)  # before the gRPC client starts its threads
    with tempfile.TemporaryDirectory(prefix="sparseserve-versus-") as tmp:
        repository = Path(tmp) / "models"
        baseline_commit = export_service(args.baseline, Path(tmp) / "baseline")
        services: dict[str, Path | None] = {
            "this": None,
            "baseline": Path(tmp) / "baseline/service",
        }
        candidate_commit = None
        if args.candidate is not None:
            candidate_commit = export_service(args.candidate, Path(tmp) / "candidate")
            services["this"] = Path(tmp) / "candidate/service"
        build_repository(repository)
        progress(f"baseline {args.baseline} = {baseline_commit[:12]}; starting both servers")
        with started_servers(repository, services, args) as servers:
            try:
                runs = asyncio.run(run_rounds(servers, args))
            except BenchmarkError as exc:
                logs = "\n".join(f"--- {arm} ---\n{s.log()}" for arm, s in servers.items())
                raise SystemExit(f"versus_commit: {exc}\n{logs}") from exc
    setup = {key: value for key, value in vars(args).items() if key != "output_dir"}
    report = {
        "benchmark": "versus_commit",
        "environment": environment(),
        "baseline_commit": baseline_commit,
        "candidate_commit": candidate_commit,
        "setup": {**setup, "server_args": SERVER_ARGS},
        "workloads": WORKLOADS,
        "summary": summarize(runs),
        "runs": runs,
    }
    write_results(args.output_dir, args.name, report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
