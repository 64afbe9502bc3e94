"""sparseserve's v2 REST endpoint against KServe's and MLServer's: req/s and server CPU
per request, mlp_small, batch 1, one interleaved run.

Each server serves `mlp_small` (64->256->256->10, FP32) from the same ONNX file, with
the minimal peer runtimes and venvs of bench/peer_servers.py (bench/peers/, created
under bench/.peers/ on the first run). All servers are pinned to one CPU and the load
generator to another. The load is tritonclient.http's asyncio client (aiohttp), N
workers sending batch-1 infer calls back to back, with tensors as:

- json: JSON `data` in and out (what curl and most REST users send; every server
  speaks it);
- binary: Triton's binary tensor data extension in and out (what tritonclient.http
  sends by default), for the servers that answer it correctly: the answer check
  decides, and a server that fails it is reported as not supporting it.

Every arm is first checked to answer what onnxruntime computes here. Server CPU per
request is utime+stime of the server's process tree from /proc. The rounds run every
(concurrency, arm) pair in an order rotated between rounds, so that drift on a shared
machine hits all alike; the ratios to sparseserve are taken within each round.

Writes bench/results/rest.json and bench/results/rest.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import (
    CLOCK_TICKS,
    BenchmarkError,
    LatencySummary,
    check_errors,
    pin_thread,
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
from bench.workload import (
    INPUT_NAME,
    MODEL_NAME,
    MODEL_SIZES,
    OUTPUT_NAME,
    onnxruntime_session,
    random_inputs,
)
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

SERVERS = ("sparseserve", "kserve", "mlserver")
ENCODINGS = ("json", "binary")
LABELS = {"sparseserve": "sparseserve", "kserve": "KServe 0.21", "mlserver": "MLServer 1.7"}


@dataclass(frozen=True, slots=True)
class Arm:
    server: str
    encoding: str  # "json" or "binary"

    @property
    def key(self) -> str:
        return f"{self.server}/{self.encoding}"


@dataclass(frozen=True, slots=True)
class ArmRun:
    """One arm at one concurrency in one round."""

    round: int
    arm: str
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float
    server_cpu_busy: float
    client_cpu_us_per_request: float


@dataclass
class RestServer:
    """A started server: its REST address and the pid its CPU is read from."""

    name: str
    pid: int
    http_url: str
    log: Any  # () -> str


# -- requests --------------------------------------------------------------------------


# What tritonclient.http.aio leaves to aiohttp's defaults, said outright: aiohttp labels
# a bytes body application/octet-stream (KServe then reads a JSON request as binary and
# refuses it) and asks for gzip (MLServer then compresses, and tritonclient, which reads
# the body raw, cannot parse it). Every server gets the same headers.
HEADERS = {
    "json": {"Content-Type": "application/json", "Accept-Encoding": "identity"},
    "binary": {"Content-Type": "application/octet-stream", "Accept-Encoding": "identity"},
}
Request = tuple[list[triton_http.InferInput], list[triton_http.InferRequestedOutput], str]


def rest_request(array: np.ndarray, encoding: str) -> Request:
    """One ready-to-send request (inputs, requested outputs, encoding), reused."""
    binary = encoding == "binary"
    tensor = triton_http.InferInput(INPUT_NAME, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    output = triton_http.InferRequestedOutput(OUTPUT_NAME, binary_data=binary)
    return [tensor], [output], encoding


async def drive(
    client: triton_http_aio.InferenceServerClient,
    requests: Sequence[Request],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    answers: dict[int, np.ndarray] | None = None,
) -> tuple[list[int], list[str]]:
    """`concurrency` workers send batch-1 infer calls back to back until `max_requests`
    were sent or `max_seconds` passed: (latencies in ns, errors)."""
    latencies: list[int] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal sent
        while sent < max_requests and time.perf_counter() < deadline:
            index = sent
            sent += 1
            inputs, outputs, encoding = requests[index % len(requests)]
            started = time.perf_counter_ns()
            try:
                # An id: KServe's REST answer fails its own validation without one.
                result = await client.infer(
                    MODEL_NAME, inputs, outputs=outputs, request_id=str(index),
                    headers=dict(HEADERS[encoding]),
                )  # fmt: skip
            except InferenceServerException as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter_ns() - started)
            if answers is not None:
                answers[index] = result.as_numpy(OUTPUT_NAME)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


# -- servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def start_servers(
    args: argparse.Namespace, tmp: Path, model: Path, pythons: dict[str, Path]
) -> Iterator[dict[str, RestServer]]:
    """The servers of `args.servers`, pinned to the server CPU and ready; stopped on exit."""
    models = {MODEL_NAME: model}
    with contextlib.ExitStack() as stack:
        servers: dict[str, RestServer] = {}
        peers: dict[str, tuple[PeerProcess, int]] = {}
        if "mlserver" in args.servers:
            http = free_port()
            peer = PeerProcess(
                [str(pythons["mlserver"].parent / "mlserver"), "start", "."],
                tmp / "mlserver", {"PYTHONPATH": str(PEERS_SRC)}, tmp / "mlserver.log",
                args.server_cpu,
            )  # fmt: skip
            ports = {"http_port": http, "grpc_port": peer.grpc_port, "metrics_port": free_port()}
            mlserver_repository(tmp / "mlserver", models, adaptive=False, ports=ports)
            peers["mlserver"] = (peer, http)
        if "kserve" in args.servers:
            http = free_port()
            command = [
                str(pythons["kserve"]), str(PEERS_SRC / "kserve_onnx.py"),
                f"--model={MODEL_NAME}={model}",
                "--http_port", str(http), "--grpc_port", "{grpc}",
                "--enable_latency_logging", "false",  # on by default: a log line per request
            ]  # fmt: skip
            peer = PeerProcess(
                command, tmp, {"KSERVE_LOGLEVEL": "WARNING"}, tmp / "kserve.log", args.server_cpu
            )
            peers["kserve"] = (peer, http)
        for peer, _ in peers.values():
            peer.start()
            stack.callback(peer.stop)
        if "sparseserve" in args.servers:
            sparseserve_repository(tmp / "sparseserve", models, None)
            # As compare_servers.py starts it: one onnxruntime thread per run.
            serve_args = ["--intra-op-threads", "1", "--inference-threads", "2"]
            serve_args += ["--log-level", "WARNING"]
            process = stack.enter_context(
                ServerProcess(
                    tmp / "sparseserve", *serve_args, cpu=args.server_cpu, startup_timeout=120
                )
            )
            servers["sparseserve"] = RestServer(
                "sparseserve", process.pid, process.http_url, process.log
            )
        for name, (peer, http) in peers.items():
            peer.wait_ready([MODEL_NAME], timeout=180)
            servers[name] = RestServer(name, peer.pid, f"127.0.0.1:{http}", peer.log)
        yield servers


# -- the run ---------------------------------------------------------------------------


async def check_arms(
    clients: dict[str, triton_http_aio.InferenceServerClient],
    arrays: list[np.ndarray],
    model: Path,
) -> tuple[list[Arm], dict[str, str]]:
    """The arms whose answers match onnxruntime here; the others, with why not."""
    session = onnxruntime_session(model, 1)
    wanted = [session.run([OUTPUT_NAME], {INPUT_NAME: a})[0] for a in arrays]
    usable: list[Arm] = []
    refused: dict[str, str] = {}
    for server in clients:
        for encoding in ENCODINGS:
            arm = Arm(server, encoding)
            requests = [rest_request(a, encoding) for a in arrays]
            answers: dict[int, np.ndarray] = {}
            try:
                _, errors = await drive(clients[server], requests, 4, len(arrays), 60, answers)
            except Exception as exc:  # a peer that garbles the protocol: not comparable
                errors = [f"{type(exc).__name__}: {exc}"]
            problem = errors[0] if errors else ""
            for index, want in enumerate(wanted):
                got = answers.get(index)
                if problem:
                    break
                if got is None or got.shape != want.shape:
                    problem = f"input {index}: answer {got!r}"
                elif not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                    problem = (
                        f"input {index}: differs from onnxruntime by {np.abs(got - want).max():.3g}"
                    )
            if problem:
                refused[arm.key] = problem[:300]
                progress(f"{arm.key}: not measured, answer check failed: {problem[:200]}")
            else:
                usable.append(arm)
    if not any(a.server == "sparseserve" for a in usable) and "sparseserve" in clients:
        raise BenchmarkError(f"sparseserve failed its own answer check: {refused}")
    return usable, refused


async def measure(
    client: triton_http_aio.InferenceServerClient,
    server: RestServer,
    arm: Arm,
    requests: Sequence[Request],
    concurrency: int,
    args: argparse.Namespace,
    round_index: int,
) -> ArmRun:
    what = f"{arm.key} at concurrency {concurrency}"
    _, errors = await drive(client, requests, concurrency, args.warmup, 60)
    check_errors(errors, args.warmup, f"warm-up of {what}")
    ticks_before, _ = tree_cpu_ticks(server.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    latencies, errors = await drive(client, requests, concurrency, args.requests, args.max_seconds)
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    ticks_after, _ = tree_cpu_ticks(server.pid)
    check_errors(errors, len(latencies) + len(errors), f"round {round_index}, {what}")
    done = len(latencies)
    cpu_s = (ticks_after - ticks_before) / CLOCK_TICKS
    return ArmRun(
        round=round_index,
        arm=arm.key,
        concurrency=concurrency,
        requests=done,
        wall_s=wall,
        requests_per_s=done / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_us_per_request=cpu_s / done * 1e6,
        server_cpu_busy=cpu_s / wall,
        client_cpu_us_per_request=client_cpu / done * 1e6,
    )


async def run_rounds(
    args: argparse.Namespace, servers: dict[str, RestServer], model: Path
) -> tuple[list[ArmRun], list[Arm], dict[str, str]]:
    arrays = random_inputs(64, args.seed)
    clients = {
        name: triton_http_aio.InferenceServerClient(server.http_url, conn_limit=64)
        for name, server in servers.items()
    }
    runs: list[ArmRun] = []
    try:
        arms, refused = await check_arms(clients, arrays, model)
        requests = {e: [rest_request(a, e) for a in arrays] for e in ENCODINGS}
        pairs = [(c, arm) for c in args.concurrency for arm in arms]
        for round_index in range(args.rounds):
            for concurrency, arm in rotated(pairs, round_index):
                run = await measure(
                    clients[arm.server], servers[arm.server], arm, requests[arm.encoding],
                    concurrency, args, round_index,
                )  # fmt: skip
                runs.append(run)
                progress(
                    f"round {round_index}: c={concurrency:<2} {arm.key:<19} "
                    f"{run.requests_per_s:7.0f} req/s  p50 {run.latency_ms.p50:6.2f} ms  "
                    f"p99 {run.latency_ms.p99:6.2f} ms  "
                    f"CPU {run.server_cpu_us_per_request:6.0f} µs/req"
                )
    finally:
        for client in clients.values():
            await client.close()
    return runs, arms, refused


# -- summary and report ----------------------------------------------------------------


def summarize(runs: Sequence[ArmRun], arms: Sequence[Arm], concurrency: Sequence[int]) -> dict:
    """Per concurrency and arm: median [min, max] over rounds, and the ratio to
    sparseserve with the same encoding, taken within each round."""
    by_key = {(r.concurrency, r.arm, r.round): r for r in runs}
    summary: dict[str, Any] = {}
    for c in concurrency:
        level: dict[str, Any] = {}
        for arm in arms:
            mine = [r for r in runs if (r.concurrency, r.arm) == (c, arm.key)]
            if not mine:
                continue
            entry: dict[str, Any] = {
                "requests_per_s": Spread.of([r.requests_per_s for r in mine]),
                "latency_p50_ms": Spread.of([r.latency_ms.p50 for r in mine]),
                "latency_p99_ms": Spread.of([r.latency_ms.p99 for r in mine]),
                "server_cpu_us_per_request": Spread.of([r.server_cpu_us_per_request for r in mine]),
                "server_cpu_busy": Spread.of([r.server_cpu_busy for r in mine]),
                "rounds": len(mine),
            }
            base = f"sparseserve/{arm.encoding}"
            pairs = [(r, by_key.get((c, base, r.round))) for r in mine]
            pairs = [(r, b) for r, b in pairs if b is not None]
            if arm.server != "sparseserve" and pairs:
                entry["cpu_per_request_vs_sparseserve"] = Spread.of(
                    [r.server_cpu_us_per_request / b.server_cpu_us_per_request for r, b in pairs]
                )
                entry["requests_per_s_vs_sparseserve"] = Spread.of(
                    [r.requests_per_s / b.requests_per_s for r, b in pairs]
                )
            level[arm.key] = entry
        summary[f"c={c}"] = level
    return summary


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    args = report["arguments"]
    lines = [
        "# v2 REST: sparseserve vs KServe vs MLServer",
        "",
        f"`mlp_small` ({'→'.join(map(str, MODEL_SIZES))}, FP32, batch 1), tritonclient.http "
        f"asyncio client, {args['rounds']} interleaved rounds, up to {args['requests']} "
        f"requests or {args['max_seconds']} s per arm and level. Every server pinned to CPU "
        f"{args['server_cpu']}, the client to CPU {args['client_cpu']}. Server CPU is the "
        "utime+stime of the server's process tree. json: JSON tensors in and out; binary: "
        "Triton's binary tensor data extension in and out. Median [min, max] over rounds; "
        "ratios to sparseserve with the same encoding, taken within each round.",
        "",
        f"Load average (1 min) on the machine: {report['load_average_1m']['before']:.1f} "
        f"before, {report['load_average_1m']['after']:.1f} after, on {env['cpu_count']} "
        "cores. Above the core count, absolute figures are inflated for every server alike; "
        "the ratios, taken within each round, are what carries over.",
        "",
    ]
    header = [
        "concurrency", "server / tensors", "req/s", "p50 ms", "p99 ms",
        "server CPU µs/req", "CPU/req vs sparseserve", "req/s vs sparseserve",
    ]  # fmt: skip
    rows = []
    for level, arms in report["summary"].items():
        for key, entry in arms.items():
            server, encoding = key.split("/")
            cpu_ratio = entry.get("cpu_per_request_vs_sparseserve")
            rps_ratio = entry.get("requests_per_s_vs_sparseserve")
            rows.append(
                [
                    level.removeprefix("c="),
                    f"{LABELS[server]} / {encoding}",
                    fmt_spread(Spread(**entry["requests_per_s"])),
                    f"{entry['latency_p50_ms']['median']:.2f}",
                    f"{entry['latency_p99_ms']['median']:.2f}",
                    fmt_spread(Spread(**entry["server_cpu_us_per_request"])),
                    f"{cpu_ratio['median']:.2f}x" if cpu_ratio else "",
                    f"{rps_ratio['median']:.2f}x" if rps_ratio else "",
                ]
            )
    lines += markdown_table(header, rows, left=2)
    if report["not_measured"]:
        lines += ["", "Not measured (the answer check failed, so the arm is not comparable):", ""]
        lines += [f"- {key}: `{why}`" for key, why in report["not_measured"].items()]
    peers = [
        f"- {LABELS[name]}: " + ", ".join(f"{k} {v}" for k, v in versions.items())
        for name, versions in report["peer_versions"].items()
    ]
    lines += ["", "## Machine and versions", "", *machine_lines(env, peers)]
    return "\n".join(lines) + "\n"


def as_dict(value: Any) -> Any:
    if isinstance(value, Spread):
        return {"median": value.median, "min": value.min, "max": value.max}
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    return value


# -- entry point -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3000, help="most per arm and level")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="most per arm and level")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default=Path(__file__).stem, help="results file name")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pythons = {
        name: ensure_venv(name, requirements)
        for name, requirements in peer_requirements().items()
        if name in args.servers
    }
    pin_thread(args.client_cpu)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rest-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = onnx_models.mlp(tmp / "mlp_small.onnx", sizes=MODEL_SIZES)
        with start_servers(args, tmp, model, pythons) as servers:
            try:
                runs, arms, refused = asyncio.run(run_rounds(args, servers, model))
            except BenchmarkError:
                for server in servers.values():
                    print(f"--- {server.name} log ---\n{server.log()[-3000:]}", file=sys.stderr)
                raise
    report = {
        "environment": environment(),
        "peer_versions": {name: venv_versions(python) for name, python in pythons.items()},
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": as_dict(summarize(runs, arms, args.concurrency)),
        "not_measured": refused,
        # The machine is shared: a load average above its core count inflates every
        # server's CPU per request (cache misses, migrations); compare the ratios.
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "runs": runs,
    }
    write_results(args.output_dir, args.name, report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
