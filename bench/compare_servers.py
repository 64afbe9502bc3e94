"""sparseserve against MLServer and KServe: the same models, load and accounting, one run.

Serves `mlp_small` (64->256->256->10) and `mlp_large` (1024->4096->4096->1000), FP32,
from five servers running side by side:

- sparseserve, as it is (no batching), and sparseserve with dynamic batching on for
  mlp_large (a config.pbtxt);
- MLServer, single process (`parallel_workers: 0`), and MLServer with adaptive batching
  (`max_batch_size` 32, `max_batch_time` 2 ms);
- KServe's `ModelServer` with gRPC.

The peers run the minimal runtimes in bench/peers/ (an onnxruntime session with one
intra-op thread, as their docs describe custom runtimes), each in its own venv under
bench/.peers/ (created with pip on the first run, reused afterwards). Every server is
checked against onnxruntime in this process first, then loaded with the same batch-1
requests by the same loop (`drive_unary` from bench/measure.py, tritonclient's
asyncio gRPC client); server CPU per request is utime+stime of the server's process tree
from /proc. Each round runs every level against every server that serves its model, in
an order rotated between rounds, so that drift on this shared machine hits all alike.

Writes bench/results/compare_servers.json (every number, machine, versions of every
server, command) and bench/results/compare_servers.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
    check_errors,
    drive_unary,
    pin_thread,
    process_tree,
    tree_cpu_ticks,
)
from bench.peer_servers import (
    PEERS_SRC,
    PeerProcess,
    ensure_venv,
    free_port,
    mlserver_repository,
    peer_requirements,
    sparseserve_repository,
    venv_versions,
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
from bench.workload import INPUT_NAME, OUTPUT_NAME, onnxruntime_session, triton_inputs
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

MODELS = {"mlp_small": (64, 256, 256, 10), "mlp_large": (1024, 4096, 4096, 1000)}
# (model, concurrency) levels, as issue 7 reports them.
LEVELS = (("mlp_small", 1), ("mlp_small", 8), ("mlp_small", 32), ("mlp_large", 32))
# A level as run: (model, concurrency, the server's CPUs as "0" or "0,1").
Level = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class Server:
    """One arm of the comparison."""

    key: str
    label: str
    models: tuple[str, ...]  # the models it serves
    baseline: str  # the sparseserve arm it is compared with


SERVERS = (
    Server("sparseserve", "sparseserve", ("mlp_small", "mlp_large"), "sparseserve"),
    Server("sparseserve_batching", "sparseserve, dynamic batching", ("mlp_large",), "sparseserve"),
    Server("mlserver", "MLServer", ("mlp_small", "mlp_large"), "sparseserve"),
    Server(
        "mlserver_adaptive",
        "MLServer, adaptive batching",
        ("mlp_small", "mlp_large"),
        "sparseserve_batching",
    ),
    Server("kserve", "KServe", ("mlp_small", "mlp_large"), "sparseserve"),
)
SERVER_BY_KEY = {server.key: server for server in SERVERS}


@dataclass(frozen=True, slots=True)
class ArmRun:
    """One server at one level in one round."""

    round: int
    server: str
    model: str
    concurrency: int
    cpus: str  # the server's CPU affinity during the level
    requests: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float
    server_cpu_busy: float  # server CPU seconds / wall seconds
    server_processes: int  # processes in the server's tree (MLServer workers count)
    client_cpu_us_per_request: float


# -- peer venvs ------------------------------------------------------------------------


# -- servers ---------------------------------------------------------------------------


def sparseserve_args(args: argparse.Namespace) -> list[str]:
    return [
        "--intra-op-threads", "1", "--inference-threads", str(args.inference_threads),
        "--log-level", "WARNING",
    ]  # fmt: skip


def batching_config(args: argparse.Namespace) -> str:
    return (
        f"max_batch_size: {args.max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {args.max_queue_delay_us} }}\n"
        f"instance_group [{{ count: {args.instances} kind: KIND_CPU }}]\n"
    )


@dataclass
class Running:
    """A started server: what the load loop and the accounting need."""

    server: Server
    pid: int
    grpc_url: str
    log: Any  # () -> str


@contextlib.contextmanager
def start_servers(
    args: argparse.Namespace, tmp: Path, models: dict[str, Path], pythons: dict[str, Path]
) -> Iterator[dict[str, Running]]:
    """All five servers, pinned to the server CPU, ready; stopped on exit."""
    sparse_args = sparseserve_args(args)
    peers: dict[str, PeerProcess] = {}
    for key, adaptive in (("mlserver", False), ("mlserver_adaptive", True)):
        repo = tmp / key
        http, metrics = free_port(), free_port()
        peer = PeerProcess(
            [str(pythons["mlserver"].parent / "mlserver"), "start", "."],
            repo, {"PYTHONPATH": str(PEERS_SRC)}, tmp / f"{key}.log", args.server_cpu,
        )  # fmt: skip
        ports = {"http_port": http, "grpc_port": peer.grpc_port, "metrics_port": metrics}
        mlserver_repository(repo, models, adaptive, ports)
        peers[key] = peer
    kserve_command = [
        str(pythons["kserve"]), str(PEERS_SRC / "kserve_onnx.py"),
        *(f"--model={name}={path}" for name, path in models.items()),
        "--http_port", str(free_port()), "--grpc_port", "{grpc}",
        "--enable_latency_logging", "false",  # on by default: a log line per request
    ]  # fmt: skip
    # KSERVE_LOGLEVEL: its gRPC interceptor logs every call at INFO.
    peers["kserve"] = PeerProcess(
        kserve_command, tmp, {"KSERVE_LOGLEVEL": "WARNING"}, tmp / "kserve.log", args.server_cpu
    )
    with contextlib.ExitStack() as stack:
        for peer in peers.values():
            peer.start()
            stack.callback(peer.stop)
        running: dict[str, Running] = {}
        for key, config in (("sparseserve", None), ("sparseserve_batching", batching_config(args))):
            served = {m: models[m] for m in SERVER_BY_KEY[key].models}
            sparseserve_repository(tmp / key, served, config)
            process = stack.enter_context(
                ServerProcess(tmp / key, *sparse_args, cpu=args.server_cpu, startup_timeout=120)
            )
            running[key] = Running(SERVER_BY_KEY[key], process.pid, process.grpc_url, process.log)
        for key, peer in peers.items():
            peer.wait_ready(SERVER_BY_KEY[key].models, timeout=180)
            running[key] = Running(SERVER_BY_KEY[key], peer.pid, peer.grpc_url, peer.log)
        yield {s.key: running[s.key] for s in SERVERS if s.key in args.servers}


# -- accounting ------------------------------------------------------------------------


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Move every thread of the server's tree to `cpus` (threads started later inherit)."""
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def peak_rss_mib(pid: int) -> float:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total / (1024 * 1024)


# -- the run ---------------------------------------------------------------------------


async def check_answers(
    clients: dict[str, triton_aio.InferenceServerClient],
    running: dict[str, Running],
    arrays: dict[str, list[np.ndarray]],
    requests: dict[str, list[Any]],
    models: dict[str, Path],
) -> None:
    """Every server must answer what onnxruntime computes here, or its timings mean
    nothing: every input once, 8 at a time (so that the batching arms batch)."""
    for model, path in models.items():
        session = onnxruntime_session(path, 1)
        wanted = [session.run([OUTPUT_NAME], {INPUT_NAME: a})[0] for a in arrays[model]]
        for key, server in running.items():
            if model not in server.server.models:
                continue
            answers: dict[int, Any] = {}
            _, errors = await drive_unary(
                clients[key], requests[model], 8, len(requests[model]), 120, answers, model=model
            )
            check_errors(errors, len(requests[model]), f"the answer check of {key} on {model}")
            for index, want in enumerate(wanted):
                got = answers[index].as_numpy(OUTPUT_NAME) if index in answers else None
                if got is None or got.shape != want.shape:
                    raise BenchmarkError(f"{key}/{model}: input {index}: answer {got!r}")
                if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                    raise BenchmarkError(
                        f"{key}/{model}: input {index}: largest difference from onnxruntime "
                        f"{np.abs(got - want).max():.3g}"
                    )
        progress(f"answers of {model} match onnxruntime on every server")


async def measure(
    client: triton_aio.InferenceServerClient,
    running: Running,
    requests: Sequence[Any],
    model: str,
    concurrency: int,
    cpus: set[int],
    args: argparse.Namespace,
    round_index: int,
) -> ArmRun:
    what = f"{running.server.key}, {model} at concurrency {concurrency}"
    set_affinity(running.pid, cpus)
    _, errors = await drive_unary(client, requests, concurrency, args.warmup, 60, model=model)
    check_errors(errors, args.warmup, f"warm-up of {what}")
    ticks_before, _ = tree_cpu_ticks(running.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    latencies, errors = await drive_unary(
        client, requests, concurrency, args.requests, args.max_seconds, model=model
    )
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    ticks_after, processes = tree_cpu_ticks(running.pid)
    check_errors(errors, len(latencies) + len(errors), f"round {round_index}, {what}")
    if not latencies:
        raise BenchmarkError(f"no request completed: {what}")
    done = len(latencies)
    cpu_s = (ticks_after - ticks_before) / CLOCK_TICKS
    return ArmRun(
        round=round_index,
        server=running.server.key,
        model=model,
        concurrency=concurrency,
        cpus=",".join(map(str, sorted(cpus))),
        requests=done,
        wall_s=wall,
        requests_per_s=done / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_us_per_request=cpu_s / done * 1e6,
        server_cpu_busy=cpu_s / wall,
        server_processes=processes,
        client_cpu_us_per_request=client_cpu / done * 1e6,
    )


async def idle_cpu(running: dict[str, Running], seconds: float) -> dict[str, float]:
    """CPU each server uses while nobody sends it anything (they all share the server
    core, so an idle server's background work would disturb the others)."""
    before = {key: tree_cpu_ticks(r.pid)[0] for key, r in running.items()}
    await asyncio.sleep(seconds)
    return {
        key: (tree_cpu_ticks(r.pid)[0] - before[key]) / CLOCK_TICKS / seconds
        for key, r in running.items()
    }


def plan_levels(args: argparse.Namespace) -> list[Level]:
    """The levels in run order: mlp_small on the server core; mlp_large there, on every
    core, or both (`--large`)."""
    pinned = str(args.server_cpu)
    every = ",".join(map(str, sorted(os.sched_getaffinity(0) | {args.server_cpu})))
    large = {"pinned": [pinned], "unpinned": [every], "both": [pinned, every]}[args.large]
    return [
        *((model, c, pinned) for model, c in LEVELS if model == "mlp_small"),
        *(("mlp_large", c, cpus) for _, c in LEVELS[3:] for cpus in large),
    ]


async def run_rounds(
    args: argparse.Namespace, running: dict[str, Running], models: dict[str, Path]
) -> tuple[list[ArmRun], dict[str, float]]:
    rng = np.random.default_rng(args.seed)
    arrays = {
        name: [rng.standard_normal((1, sizes[0])).astype(np.float32) for _ in range(64)]
        for name, sizes in MODELS.items()
    }
    requests = {name: triton_inputs(a) for name, a in arrays.items()}
    levels = plan_levels(args)
    runs: list[ArmRun] = []
    clients = {key: triton_aio.InferenceServerClient(r.grpc_url) for key, r in running.items()}
    try:
        await check_answers(clients, running, arrays, requests, models)
        idle = await idle_cpu(running, args.idle_seconds)
        for round_index in range(args.rounds):
            for model, concurrency, cpus in rotated(levels, round_index):
                serving = [k for k, r in running.items() if model in r.server.models]
                for key in rotated(serving, round_index):
                    run = await measure(
                        clients[key], running[key], requests[model], model, concurrency,
                        {int(cpu) for cpu in cpus.split(",")}, args, round_index,
                    )  # fmt: skip
                    runs.append(run)
                    progress(
                        f"round {round_index}: {model} c={concurrency:<3} CPU {cpus:<3} {key:<21} "
                        f"{run.requests_per_s:7.0f} req/s  p50 {run.latency_ms.p50:7.2f} ms  "
                        f"p99 {run.latency_ms.p99:7.2f} ms  "
                        f"CPU {run.server_cpu_us_per_request:6.0f} µs/req"
                    )
    finally:
        for client in clients.values():
            await client.close()
    return runs, idle


# -- summary and report ----------------------------------------------------------------


FIGURES = ("requests_per_s", "latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_request")


def _figure(run: ArmRun, figure: str) -> float:
    if figure.startswith("latency_"):
        return getattr(run.latency_ms, figure.split("_")[1])
    return getattr(run, figure)


def summarize(runs: Sequence[ArmRun], levels: Sequence[Level]) -> dict[str, Any]:
    """Per level ("model@concurrency@cpus") and server: median [min, max] over rounds of
    each figure, and the ratios to sparseserve's arms, each taken within one round."""
    by_key = {(r.model, r.concurrency, r.cpus, r.server, r.round): r for r in runs}
    summary: dict[str, Any] = {}
    for model, concurrency, cpus in levels:
        here = (model, concurrency, cpus)
        servers = [s.key for s in SERVERS if any(k[:4] == (*here, s.key) for k in by_key)]
        if not servers:
            continue
        level: dict[str, Any] = {}
        for key in servers:
            mine = [r for r in runs if (r.model, r.concurrency, r.cpus, r.server) == (*here, key)]
            entry: dict[str, Any] = {f: Spread.of([_figure(r, f) for r in mine]) for f in FIGURES}
            entry["client_cpu_us_per_request"] = Spread.of(
                [r.client_cpu_us_per_request for r in mine]
            )
            entry["server_cpu_busy"] = Spread.of([r.server_cpu_busy for r in mine])
            entry["rounds"] = len(mine)
            entry["vs"] = {}
            for base in ("sparseserve", "sparseserve_batching"):
                if base == key or base not in servers:
                    continue
                pairs = [
                    (r, by_key[(*here, base, r.round)])
                    for r in mine
                    if (*here, base, r.round) in by_key
                ]
                entry["vs"][base] = {
                    "requests_per_s": Spread.of(
                        [r.requests_per_s / b.requests_per_s for r, b in pairs]
                    ),
                    "server_cpu_us_per_request": Spread.of(
                        [
                            r.server_cpu_us_per_request / b.server_cpu_us_per_request
                            for r, b in pairs
                        ]
                    ),
                    "latency_p99_ms": Spread.of(
                        [r.latency_ms.p99 / b.latency_ms.p99 for r, b in pairs]
                    ),
                }
            level[key] = entry
        summary[f"{model}@{concurrency}@{cpus}"] = level
    return summary


def _ratio(entry: dict[str, Any], base: str, figure: str) -> str:
    ratio = entry["vs"].get(base, {}).get(figure)
    return "—" if ratio is None else f"{ratio.median:.2f}x"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """One plain sentence per peer and level: faster or slower than its sparseserve arm."""
    lines = []
    for level_key, level in summary.items():
        model, concurrency, cpus = level_key.split("@")
        for key, entry in level.items():
            server = SERVER_BY_KEY[key]
            if key.startswith("sparseserve"):
                continue
            base = server.baseline if server.baseline in entry["vs"] else "sparseserve"
            if base not in entry["vs"]:
                continue
            speed = entry["vs"][base]["requests_per_s"].median
            cpu = entry["vs"][base]["server_cpu_us_per_request"].median
            p99 = entry["vs"][base]["latency_p99_ms"].median
            faster = _compare(1 / speed, "faster", "slower", "as fast")
            than = "as" if faster.startswith("about") else "than"
            lines.append(
                f"- {model} c={concurrency}, server on CPU {cpus}: {SERVER_BY_KEY[base].label} is "
                f"**{faster}** {than} {server.label} "
                f"({1 / speed:.2f}x its req/s), uses "
                f"**{_compare(cpu, 'less', 'more', 'as much')}** server CPU per request "
                f"({1 / cpu:.2f}x its µs) and has {1 / p99:.2f}x its p99."
            )
    return lines


def _compare(ratio: float, above: str, below: str, same: str, noise: float = 0.03) -> str:
    """`above` or `below` 1, or "about `same`" within what one level's noise moves."""
    if abs(ratio - 1) < noise:
        return f"about {same}"
    return above if ratio > 1 else below


REFERENCES = (
    ("MLServer 1.7 (single process)", "1040", "680", "141", "313"),
    ("MLServer 1.7, adaptive batching 32/2 ms", "208", "2000", "188", "219"),
    ("KServe 0.21", "1256", "524", "153", "264"),
)


def render_markdown(report: dict[str, Any]) -> str:
    summary, env, setup = report["summary"], report["environment"], report["setup"]
    lines = [
        "# sparseserve vs MLServer vs KServe",
        "",
        f"Medians over {setup['rounds']} interleaved rounds ([min, max] for req/s and CPU). "
        "Server CPU per request: utime+stime of the server's whole process tree (all "
        "threads) over a level / requests completed. Ratios: this server's figure / "
        "sparseserve's, taken within each round (where the servers of a level ran back to back), "
        "median over rounds; req/s ratio < 1 and CPU ratio > 1 mean sparseserve is ahead. "
        "Cores busy: the server's CPU seconds / wall seconds (1.0 = one core saturated).",
        "",
    ]
    for model in MODELS:
        levels = {k: v for k, v in summary.items() if k.startswith(f"{model}@")}
        if not levels:
            continue
        bases = [
            b
            for b in ("sparseserve", "sparseserve_batching")
            if any(b in lv for lv in levels.values())
        ]
        header = ["concurrency", "server CPUs", "server", "req/s", "p50 ms", "p99 ms"]
        header += ["server CPU µs/req", "cores busy"]
        for base in bases:
            short = "sparseserve" if base == "sparseserve" else "sparseserve+batching"
            header += [f"req/s ÷ {short}", f"CPU ÷ {short}"]
        rows = []
        for level_key, level in levels.items():
            _, concurrency, cpus = level_key.split("@")
            for key, entry in level.items():
                row = [
                    concurrency, cpus, SERVER_BY_KEY[key].label,
                    fmt_spread(entry["requests_per_s"]),
                    f"{entry['latency_p50_ms'].median:.2f}",
                    f"{entry['latency_p99_ms'].median:.2f}",
                    fmt_spread(entry["server_cpu_us_per_request"]),
                    f"{entry['server_cpu_busy'].median:.2f}",
                ]  # fmt: skip
                for base in bases:
                    row += [
                        _ratio(entry, base, "requests_per_s"),
                        _ratio(entry, base, "server_cpu_us_per_request"),
                    ]
                rows.append(row)
        sizes = "→".join(map(str, MODELS[model]))
        lines += [
            f"## {model} ({sizes}, FP32, batch-1 requests)",
            "",
            *markdown_table(header, rows, left=3),
            "",
        ]
    lines += [
        "## Where sparseserve is faster or slower",
        "",
        "Each peer against the sparseserve arm like it (adaptive batching against dynamic "
        "batching where both ran, the others against sparseserve without batching):",
        "",
        *report["verdicts"],
        "",
        "## Reference points quoted in issue 7",
        "",
        "Measured earlier on this machine by someone else, not by this run; the tables above "
        "are what this run measured:",
        "",
        *markdown_table(
            (
                "server",
                "mlp_small c=1 req/s",
                "server CPU µs/req",
                "mlp_large c=32 req/s",
                "p99 ms",
            ),
            REFERENCES,
        ),
        "",
        "## Setup",
        "",
        "- every server serves the same ONNX files with onnxruntime "
        f"{env['packages']['onnxruntime']}, one intra-op thread, ORT_ENABLE_ALL; Prometheus "
        "metrics on in all of them (their default); per-request logging off in all of them "
        "(MLServer `debug: false`, KServe `--enable_latency_logging false` and "
        "`KSERVE_LOGLEVEL=WARNING`, sparseserve `--log-level WARNING`)",
        f"- sparseserve: `sparseserve serve {shlex.join(setup['sparseserve_args'])}`; with "
        f"batching, mlp_large has config.pbtxt `{setup['batching_config']}`",
        "- MLServer: `mlserver start` with `parallel_workers: 0` and the runtime "
        "bench/peers/mlserver_onnx.py; adaptive batching: the same with `max_batch_size: 32`, "
        "`max_batch_time: 0.002` per model",
        "- KServe: bench/peers/kserve_onnx.py (`kserve.Model` + `ModelServer`, gRPC on, "
        "one process)",
        f"- all servers run side by side for the whole run, started on CPU {setup['server_cpu']}; "
        "before each level the server under test is moved (every thread) to the level's "
        "server CPUs (mlp_large: on the server core, as in issue 7's method, and on every "
        "core, as in bench/batching.py, per `--large`). Client: tritonclient.grpc.aio in "
        f"this process, pinned to CPU {setup['client_cpu']}; 64 pre-generated random inputs "
        "per model; every server's answers checked against onnxruntime in this process first",
        f"- per level and server: {setup['warmup']} warm-up requests, then up to "
        f"{setup['requests']} requests or {setup['max_seconds']} s; levels and servers in "
        "rotated order each round",
        "- idle CPU of each server (all share the server core): "
        + ", ".join(f"{k} {v * 100:.1f} %" for k, v in report["idle_cpu"].items()),
        "- peak RSS (process tree): "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in report["peak_rss_mib"].items()),
        "",
        "## Caveats",
        "",
        "- The peers run the minimal runtimes their docs show, which call `session.run` on "
        "the event loop: one run at a time per process. sparseserve runs `mlp_small` inline "
        "too, but hands longer runs (`mlp_large`) to its pool of `--inference-threads` "
        "threads, so with both cores allowed it can run two batch-1 `mlp_large` runs at once "
        "(see cores busy). MLServer's `parallel_workers` and KServe's `--workers` (more "
        "processes) are not measured: the issue asks for single processes.",
        "- Per-request logging is off everywhere; left at their defaults, MLServer (`debug: "
        "true`) and KServe (latency logging, INFO gRPC access log) would each log every "
        "request and cost more CPU than shown here.",
        "- All five servers stay up for the whole run on the same machine; idle, they use "
        "the CPU listed above. The client shares the machine (its own core for mlp_small, "
        "a core the server may also use for mlp_large) and talks over loopback.",
        "- The machine is shared and noisy: compare servers within this run (the ratios), "
        "and look at [min, max]; figures from other runs or machines are not comparable.",
        "",
        "## Machine and versions",
        "",
        *machine_lines(
            env,
            extra=[
                f"- {name} venv: " + ", ".join(f"{p} {v}" for p, v in versions.items())
                for name, versions in report["peer_versions"].items()
            ],
        ),
        "",
    ]
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100, help="requests before each level")
    parser.add_argument("--requests", type=int, default=5000, help="most requests per level")
    parser.add_argument("--max-seconds", type=float, default=4.0, help="most time per level")
    parser.add_argument(
        "--servers", nargs="+", default=[s.key for s in SERVERS], choices=[s.key for s in SERVERS]
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="core the servers run on")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the client runs on")
    parser.add_argument(
        "--large",
        choices=("pinned", "unpinned", "both"),
        default="both",
        help="mlp_large with the server on --server-cpu, on every core, or both in turn",
    )
    parser.add_argument("--inference-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="sparseserve batches at once (config.pbtxt instance_group count); on one core a "
        "second one only takes turns with the first (bench/batching.py measured 658 vs 935 req/s)",
    )
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    requirements = peer_requirements()
    pythons = {name: ensure_venv(name, reqs) for name, reqs in requirements.items()}
    peer_versions = {name: venv_versions(python) for name, python in pythons.items()}
    # Before the gRPC clients start their threads, so that they inherit the pinning.
    pin_thread(args.client_cpu)
    with tempfile.TemporaryDirectory(prefix="sparseserve-compare-") as tmp_name:
        tmp = Path(tmp_name)
        models = {
            name: onnx_models.mlp(tmp / "models" / f"{name}.onnx", sizes=sizes)
            for name, sizes in MODELS.items()
        }
        with start_servers(args, tmp, models, pythons) as running:
            try:
                runs, idle = asyncio.run(run_rounds(args, running, models))
            except BenchmarkError as exc:
                logs = "\n".join(f"--- {k} log ---\n{r.log()[-4000:]}" for k, r in running.items())
                raise SystemExit(f"compare_servers: {exc}\n{logs}") from exc
            peak = {key: peak_rss_mib(r.pid) for key, r in running.items()}
    levels = plan_levels(args)
    summary = summarize(runs, levels)
    setup = {k: v for k, v in vars(args).items() if k != "output_dir"}
    report = {
        "benchmark": "compare_servers",
        "environment": environment(),
        "peer_versions": peer_versions,
        "peer_requirements": requirements,
        "setup": {
            **setup,
            "sparseserve_args": sparseserve_args(args),
            "batching_config": " ".join(batching_config(args).split()),
            "levels": levels,
        },
        "models": {name: list(sizes) for name, sizes in MODELS.items()},
        "references_from_issue": REFERENCES,
        "idle_cpu": idle,
        "peak_rss_mib": peak,
        "summary": summary,
        "verdicts": verdicts(summary),
        "runs": runs,
    }
    write_results(args.output_dir, "compare_servers", report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
