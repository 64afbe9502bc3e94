"""Threads and cores: onnxruntime intra-op threads vs concurrent inference threads.

Four sparseserve servers run side by side, unpinned (the point is using every core),
each serving `mlp_small` (64->256->256->10) and `mlp_large` (1024->4096->4096->1000),
FP32, with one threading setting:

    A  --intra-op-threads 1 --inference-threads 2   (the defaults on a 2-core machine)
    B  --intra-op-threads 2 --inference-threads 1   (one run at a time, on both cores)
    C  --intra-op-threads 2 --inference-threads 2
    D  --intra-op-threads 0 --inference-threads 2   (0: onnxruntime's own default)

Every server is first checked to answer what onnxruntime computes in this process. Then
each round runs every level (model, concurrency) against every setting, back to back, in
an order rotated between rounds so that drift on this shared machine hits all alike:
batch-1 ModelInfer calls from `drive_unary` (bench/measure.py), `concurrency` in
flight, a warm-up, then up to a request count or a time limit. Per run: client req/s and
latency, server CPU per request (utime+stime of the server, all threads, from /proc).
Ratios to setting A are taken within each round, then the median.

Writes bench/results/threads.json (every number, machine, versions, command) and
bench/results/threads.md (one table per model and a conclusion). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
)
from bench.workload import INPUT_NAME, OUTPUT_NAME, onnxruntime_session, triton_inputs
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

MODELS = {"mlp_small": (64, 256, 256, 10), "mlp_large": (1024, 4096, 4096, 1000)}


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    intra_op_threads: int  # onnxruntime intra-op threads per session (0: its default)
    inference_threads: int  # sparseserve threads running session.run

    @property
    def label(self) -> str:
        intra = "0 (ort default)" if self.intra_op_threads == 0 else str(self.intra_op_threads)
        threads = "thread" if self.inference_threads == 1 else "threads"
        return f"{self.key} (intra-op {intra}, {self.inference_threads} inference {threads})"

    def server_args(self) -> list[str]:
        return [
            "--intra-op-threads", str(self.intra_op_threads),
            "--inference-threads", str(self.inference_threads),
            "--log-level", "WARNING",
        ]  # fmt: skip


SETTINGS = (Setting("A", 1, 2), Setting("B", 2, 1), Setting("C", 2, 2), Setting("D", 0, 2))
BASELINE = "A"
# Paired ratios closer to 1 than this are called "about the same".
NOISE = 0.05


@dataclass(frozen=True, slots=True)
class SettingRun:
    """One level (model, concurrency), one setting, one round."""

    round: int
    model: str
    concurrency: int
    setting: str
    requests: int
    wall_s: float
    requests_per_s: float
    latency_ms: LatencySummary
    server_cpu_us_per_request: float
    server_cores_busy: float  # server CPU seconds / wall seconds
    client_cores_busy: float  # this process's CPU seconds / wall seconds
    idle_servers_cores_busy: float  # the three other servers, meanwhile


# -- the run ---------------------------------------------------------------------------


def build_repository(root: Path) -> dict[str, Path]:
    return {
        name: onnx_models.mlp(root / name / "1" / "model.onnx", sizes=sizes)
        for name, sizes in MODELS.items()
    }


async def check_answers(
    clients: dict[str, triton_aio.InferenceServerClient],
    arrays: dict[str, list[np.ndarray]],
    requests: dict[str, list[Any]],
    models: dict[str, Path],
) -> None:
    """Every server must answer what onnxruntime computes here, or its timings mean
    nothing: every input once, 8 at a time."""
    for model, path in models.items():
        session = onnxruntime_session(path, 1)
        wanted = [session.run([OUTPUT_NAME], {INPUT_NAME: a})[0] for a in arrays[model]]
        for key, client in clients.items():
            answers: dict[int, Any] = {}
            _, errors = await drive_unary(
                client, requests[model], 8, len(wanted), 120, answers, model=model
            )
            check_errors(errors, len(wanted), f"the answer check of {key} on {model}")
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
    pids: dict[str, int],
    requests: Sequence[Any],
    model: str,
    concurrency: int,
    setting: str,
    args: argparse.Namespace,
    round_index: int,
) -> SettingRun:
    what = f"setting {setting}, {model} at concurrency {concurrency}"
    _, errors = await drive_unary(
        client, requests, concurrency, args.warmup, args.warmup_seconds, model=model
    )
    check_errors(errors, args.warmup, f"warm-up of {what}")
    before = {key: ProcessSample.read(pid).cpu_ticks for key, pid in pids.items()}
    client_before = time.process_time()
    started = time.perf_counter()
    latencies, errors = await drive_unary(
        client, requests, concurrency, args.requests, args.max_seconds, model=model
    )
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    used = {
        key: (ProcessSample.read(pid).cpu_ticks - before[key]) / CLOCK_TICKS
        for key, pid in pids.items()
    }
    check_errors(errors, len(latencies) + len(errors), f"round {round_index}, {what}")
    if not latencies:
        raise BenchmarkError(f"no request completed: {what}")
    done = len(latencies)
    return SettingRun(
        round=round_index,
        model=model,
        concurrency=concurrency,
        setting=setting,
        requests=done,
        wall_s=wall,
        requests_per_s=done / wall,
        latency_ms=LatencySummary.of(latencies),
        server_cpu_us_per_request=used[setting] / done * 1e6,
        server_cores_busy=used[setting] / wall,
        client_cores_busy=client_cpu / wall,
        idle_servers_cores_busy=sum(s for key, s in used.items() if key != setting) / wall,
    )


async def run_rounds(
    args: argparse.Namespace, servers: dict[str, ServerProcess], models: dict[str, Path]
) -> list[SettingRun]:
    rng = np.random.default_rng(args.seed)
    arrays = {
        name: [rng.standard_normal((1, sizes[0])).astype(np.float32) for _ in range(64)]
        for name, sizes in MODELS.items()
    }
    requests = {name: triton_inputs(a) for name, a in arrays.items()}
    levels = [(model, c) for model in args.models for c in args.concurrency]
    pids = {key: server.pid for key, server in servers.items()}
    clients = {key: triton_aio.InferenceServerClient(s.grpc_url) for key, s in servers.items()}
    runs: list[SettingRun] = []
    try:
        await check_answers(clients, arrays, requests, models)
        for round_index in range(args.rounds):
            for model, concurrency in rotated(levels, round_index):
                for key in rotated(list(servers), round_index):
                    run = await measure(
                        clients[key], pids, requests[model], model, concurrency, key, args,
                        round_index,
                    )  # fmt: skip
                    runs.append(run)
                    progress(
                        f"round {round_index}: {model} c={concurrency:<2} {key} "
                        f"{run.requests_per_s:7.0f} req/s  p50 {run.latency_ms.p50:7.2f} ms  "
                        f"p99 {run.latency_ms.p99:7.2f} ms  "
                        f"CPU {run.server_cpu_us_per_request:6.0f} µs/req  "
                        f"cores {run.server_cores_busy:4.2f}"
                    )
    finally:
        for client in clients.values():
            await client.close()
    return runs


# -- summary and report ----------------------------------------------------------------


FIGURES = {
    "requests_per_s": lambda r: r.requests_per_s,
    "latency_p50_ms": lambda r: r.latency_ms.p50,
    "latency_p99_ms": lambda r: r.latency_ms.p99,
    "server_cpu_us_per_request": lambda r: r.server_cpu_us_per_request,
    "server_cores_busy": lambda r: r.server_cores_busy,
    "client_cores_busy": lambda r: r.client_cores_busy,
    "idle_servers_cores_busy": lambda r: r.idle_servers_cores_busy,
}
RATIOS = ("requests_per_s", "latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_request")


def summarize(runs: Sequence[SettingRun]) -> dict[str, Any]:
    """summary[model][concurrency][setting]: Spread (median, min, max over rounds) of each
    figure, and under "vs_A" the ratios to setting A, each taken within one round."""
    summary: dict[str, Any] = {}
    by_key = {(r.model, r.concurrency, r.setting, r.round): r for r in runs}
    for model in dict.fromkeys(r.model for r in runs):
        summary[model] = {}
        for concurrency in sorted({r.concurrency for r in runs if r.model == model}):
            level = summary[model][str(concurrency)] = {}
            for setting in dict.fromkeys(r.setting for r in runs):
                key = (model, concurrency, setting)
                mine = [r for r in runs if (r.model, r.concurrency, r.setting) == key]
                entry = {name: Spread.of([get(r) for r in mine]) for name, get in FIGURES.items()}
                pairs = [
                    (base, r)
                    for r in mine
                    if (base := by_key.get((model, concurrency, BASELINE, r.round)))
                ]
                entry[f"vs_{BASELINE}"] = {
                    name: Spread.of([FIGURES[name](r) / FIGURES[name](b) for b, r in pairs])
                    for name in RATIOS
                }
                level[setting] = entry
    return summary


def _same(ratio: Spread) -> bool:
    """Is a paired ratio to A "about the same": within NOISE, or not the same direction
    in every round?"""
    return abs(ratio.median - 1) < NOISE or ratio.min <= 1 <= ratio.max


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f} %"


def _vs(entry: dict[str, Any], figure: str) -> Spread:
    return entry[f"vs_{BASELINE}"][figure]


def _against(key: str, low: dict[str, Any], high: dict[str, Any]) -> str:
    """How setting `key` compares with A: concurrency 1 latency and CPU, concurrency 8
    throughput (paired ratios, medians)."""
    return (
        f"{key}: p50 {_pct(_vs(low[key], 'latency_p50_ms').median)}, "
        f"p99 {_pct(_vs(low[key], 'latency_p99_ms').median)}, "
        f"CPU/req {_pct(_vs(low[key], 'server_cpu_us_per_request').median)} at concurrency 1; "
        f"req/s {_pct(_vs(high[key], 'requests_per_s').median)}, "
        f"CPU/req {_pct(_vs(high[key], 'server_cpu_us_per_request').median)} at concurrency 8"
    )


def conclusion(summary: dict[str, Any]) -> list[str]:
    """Plain sentences drawn from the medians and the paired ratios to A (a difference
    counts only if it is over NOISE and in the same direction in every round)."""
    settings = {s.key: s for s in SETTINGS}
    lines = []
    # model -> (A best under load, within noise; what A gives up at concurrency 1)
    default_ok: dict[str, tuple[bool, str]] = {}
    for model, levels in summary.items():
        if "1" not in levels or "8" not in levels:
            continue
        low, high = levels["1"], levels["8"]
        fastest = min(low, key=lambda k: low[k]["latency_p50_ms"].median)
        busiest = max(high, key=lambda k: high[k]["requests_per_s"].median)
        p50, rps = _vs(low[fastest], "latency_p50_ms"), _vs(high[busiest], "requests_per_s")
        latency = f"{low[fastest]['latency_p50_ms'].median:.2f} ms"
        cpu = _vs(low[fastest], "server_cpu_us_per_request")
        if fastest != BASELINE:
            latency += (
                f" vs A's {low[BASELINE]['latency_p50_ms'].median:.2f} ms ({_pct(p50.median)}, "
                f"per round {p50.min:.2f}x to {p50.max:.2f}x"
                + (": about the same" if _same(p50) else "")
                + f"; server CPU per request {_pct(cpu.median)})"
            )
        throughput = f"{high[busiest]['requests_per_s'].median:.0f} req/s"
        if busiest != BASELINE:
            throughput += (
                f" vs A's {high[BASELINE]['requests_per_s'].median:.0f} ({_pct(rps.median)}, "
                f"per round {rps.min:.2f}x to {rps.max:.2f}x"
                + (": about the same" if _same(rps) else "")
                + ")"
            )
        lines += [
            f"- **{model}**: lowest latency at concurrency 1: **{settings[fastest].label}**, "
            f"p50 {latency}. Most throughput at concurrency 8: **{settings[busiest].label}**, "
            f"{throughput}.",
            "  Against A: "
            + "; ".join(_against(key, low, high) for key in low if key != BASELINE)
            + ".",
        ]
        default_ok[model] = (
            busiest == BASELINE or _same(rps),
            ""
            if fastest == BASELINE or _same(p50)
            else f"{fastest} has {_pct(p50.median)} p50 for {_pct(cpu.median)} server CPU per "
            f"request and {_pct(_vs(low[fastest], 'latency_p99_ms').median)} p99",
        )
    if default_ok:
        beaten = [m for m, (throughput_ok, _) in default_ok.items() if not throughput_ok]
        text = (
            f"under load (concurrency 8) no setting beats them beyond noise for "
            f"{' or '.join(default_ok)}: a sensible default for a loaded server"
            if not beaten
            else f"under load (concurrency 8) another setting beats them for {', '.join(beaten)}"
        )
        slower = [f"{m}: {why}" for m, (_, why) in default_ok.items() if why]
        text += (
            "; at concurrency 1 they give up latency, " + "; ".join(slower)
            if slower
            else "; at concurrency 1 no setting is faster beyond noise"
        )
        lines.append(
            "- **The defaults** (intra-op 1, one inference thread per core: A on this "
            f"machine): {text}."
        )
    spinning = [
        f"{key} {entry['server_cores_busy'].median:.2f}"
        for key, entry in summary.get("mlp_small", {}).get("1", {}).items()
        if settings[key].intra_op_threads != 1 and entry["server_cores_busy"].median > 1.2
    ]
    if spinning:
        a = summary["mlp_small"]["1"][BASELINE]["server_cores_busy"].median
        lines.append(
            "- **Why more intra-op threads hurt a small model**: at concurrency 1 the server "
            f"keeps {', '.join(spinning)} cores busy (A: {a:.2f}) for a model that runs in "
            "about 10 µs: onnxruntime's intra-op pool threads spin-wait for work after every "
            "run (its `allow_spinning`, on by default). The spinning keeps a core awake, which "
            "probably buys the lower p50, and costs about twice the CPU per request; under "
            "load it takes the core that gRPC, the event loop and the client need."
        )
    if "1" in summary.get("mlp_large", {}):
        low, high = summary["mlp_large"]["1"], summary["mlp_large"].get("8", {})
        best = min(low, key=lambda k: low[k]["latency_p50_ms"].median)
        if best == BASELINE or _same(_vs(low[best], "latency_p50_ms")):
            advice = "keep the defaults: no setting beats A's latency at concurrency 1 beyond noise"
        else:
            close = [
                k
                for k in low
                if k not in (best, BASELINE)
                and low[k]["latency_p50_ms"].median
                <= (1 + NOISE) * low[best]["latency_p50_ms"].median
            ]
            s = settings[best]
            advice = (
                f"more intra-op threads. Best here: {s.label}, "
                f"`--intra-op-threads {s.intra_op_threads} --inference-threads "
                f"{s.inference_threads}`, p50 {low[best]['latency_p50_ms'].median:.2f} ms instead "
                f"of A's {low[BASELINE]['latency_p50_ms'].median:.2f} ms"
                + (f"; {', '.join(close)} within {NOISE:.0%} of it" if close else "")
            )
            if best in high:
                advice += (
                    f". The price comes under load: at concurrency 8 it gives "
                    f"{_pct(_vs(high[best], 'requests_per_s').median)} req/s and "
                    f"{_pct(_vs(high[best], 'latency_p50_ms').median)} p50 against A"
                )
        lines.append(f"- **A large model at low concurrency**: {advice}.")
    return lines


TABLE_HEADER = (
    "concurrency", "setting", "req/s", "vs A", "p50 ms", "vs A", "p99 ms",
    "server CPU µs/req", "vs A", "server cores busy", "client cores busy",
)  # fmt: skip


def render_markdown(report: dict[str, Any]) -> str:
    summary, env, setup = report["summary"], report["environment"], report["setup"]
    settings = {s.key: s for s in SETTINGS}
    lines = [
        "# Threads and cores: intra-op threads vs inference threads",
        "",
        f"Medians over {setup['rounds']} interleaved rounds; req/s as median [min, max]. "
        f'"vs A": the ratio to setting A within each round (A and the others ran back to '
        "back), median over rounds. Server CPU per request: utime+stime of the server "
        "process (all threads) / requests; cores busy: server (or client) CPU seconds per "
        "second of wall time, out of "
        f"{env['cpu_count']}.",
        "",
        "## Conclusion",
        "",
        *conclusion(summary),
        "",
    ]
    for model, levels in summary.items():
        rows = []
        for concurrency, level in levels.items():
            for key, e in level.items():
                vs = e[f"vs_{BASELINE}"]
                rows.append(
                    (
                        concurrency, settings[key].label, fmt_spread(e["requests_per_s"]),
                        f"{vs['requests_per_s'].median:.2f}x",
                        f"{e['latency_p50_ms'].median:.2f}", f"{vs['latency_p50_ms'].median:.2f}x",
                        f"{e['latency_p99_ms'].median:.2f}",
                        f"{e['server_cpu_us_per_request'].median:.0f}",
                        f"{vs['server_cpu_us_per_request'].median:.2f}x",
                        f"{e['server_cores_busy'].median:.2f}",
                        f"{e['client_cores_busy'].median:.2f}",
                    )
                )  # fmt: skip
        lines += [
            f"## {model} ({'→'.join(map(str, MODELS[model]))} FP32, batch 1)",
            "",
            *markdown_table(
                TABLE_HEADER,
                rows,
                left=2,
            ),
            "",
        ]
    idle = [r.idle_servers_cores_busy for r in report["runs"]]
    lines += [
        "## Setup",
        "",
        "- settings, one server each, all four up for the whole run:",
        *(
            f"  - {s.label}: `sparseserve serve {shlex.join(s.server_args())}`, "
            f"{report['server_threads'][s.key]} threads once both models were loaded"
            for s in SETTINGS
        ),
        "- servers not pinned (they may use every core); the client (tritonclient.grpc.aio, "
        "in the benchmark process) shares the same cores over loopback",
        f"- per run: batch-1 ModelInfer calls from 64 pre-generated random inputs, "
        f"`concurrency` in flight; {setup['warmup']} warm-up requests (at most "
        f"{setup['warmup_seconds']} s), then up to {setup['requests']} requests or "
        f"{setup['max_seconds']} s; levels and settings in rotated order each round; "
        "answers of every server checked against onnxruntime first",
        f"- the three idle servers used {statistics.median(idle):.3f} cores (median, max "
        f"{max(idle):.3f}) while another was measured",
        "- mlp_small runs inline on the event loop (under `onnxruntime.inline_max_us`, "
        "100 µs); mlp_large runs on the inference threads",
        "",
        "## Machine",
        "",
        *machine_lines(env, [f"- load average before the run: {setup['load_average']}"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=100, help="requests before each run")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="most warm-up time")
    parser.add_argument("--requests", type=int, default=3000, help="most requests per run")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="most time per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the ratios to A are paired within rounds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    progress(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="sparseserve-bench-") as tmp:
        models = build_repository(Path(tmp))
        with contextlib.ExitStack() as stack:
            servers = {
                s.key: stack.enter_context(ServerProcess(Path(tmp), *s.server_args()))
                for s in SETTINGS
            }
            threads = {key: len(ProcessSample.read(s.pid).threads) for key, s in servers.items()}
            try:
                runs = asyncio.run(run_rounds(args, servers, models))
            except BenchmarkError as exc:
                logs = "\n".join(f"--- server {k} ---\n{s.log()}" for k, s in servers.items())
                raise SystemExit(f"threads: {exc}\n{logs}") from exc
    summary = summarize(runs)
    setup = {k: v for k, v in vars(args).items() if k != "output_dir"}
    report = {
        "benchmark": "threads",
        "environment": environment(),
        "setup": {**setup, "load_average": " ".join(f"{x:.2f}" for x in load)},
        "settings": [
            {**asdict(s), "label": s.label, "server_args": s.server_args()} for s in SETTINGS
        ],
        "server_threads": threads,
        "summary": summary,
        "conclusion": conclusion(summary),
        "runs": runs,
    }
    markdown = render_markdown(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "threads.json").write_text(
        json.dumps(report, indent=2, default=asdict) + "\n"
    )
    (args.output_dir / "threads.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
