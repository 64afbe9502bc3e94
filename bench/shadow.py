"""What shadow traffic costs the requests it shadows: primary latency with shadow
fraction 0 vs 1.

One sparseserve server serves a family `bench` of two variants of `mlp_small`
(64->256->256->10, FP32): `bench.dense` and `bench.pruned90` (90% of each weight matrix
zeroed by magnitude). Requests name the family, whose policy sends them to `dense`; the
policy's shadow rule runs `pruned90` on a `fraction` of them after answering. The
policy file is rewritten between runs (hot reload) so that both fractions are measured
by the same server process, in alternating order between rounds so that drift on this
shared machine hits both alike. Per run: batch-1 unary ModelInfer calls at a fixed
concurrency (`drive_unary` of bench/measure.py), latency percentiles, req/s, and
the shadow runs the server counted (compared / dropped) from its metrics. Ratios
(fraction 1 over fraction 0) are taken within each round, then the median.

Writes bench/results/shadow.json and bench/results/shadow.md. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import check_errors, drive_unary
from bench.report import REPO_ROOT, environment, machine_lines, markdown_table, rotated
from bench.workload import MODEL_SIZES, random_inputs, triton_inputs
from sparseserve.api import service_pb2, service_pb2_grpc
from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import Task, VariantManifest
from sparseserve.testing import onnx_models

FAMILY = "bench"
FRACTIONS = (0.0, 1.0)
RESULTS = REPO_ROOT / "bench" / "results"


def build_repository(root: Path) -> Path:
    for variant, sparsity in (("dense", 0.0), ("pruned90", 0.9)):
        directory = root / f"{FAMILY}.{variant}"
        onnx_models.mlp(directory / "1" / "model.onnx", MODEL_SIZES, sparsity=sparsity)
        VariantManifest(
            family=FAMILY,
            variant=variant,
            baseline=None if variant == "dense" else f"{FAMILY}.dense",
            task=Task.classification,
            sparsity=sparsity,
        ).write(directory / "sparseserve.yaml")
    return root


def policy_text(fraction: float) -> str:
    return (
        f"families:\n  {FAMILY}:\n    default: dense\n"
        f"    shadow: {{variants: [pruned90], fraction: {fraction}}}\n"
    )


def apply_policy(server: ServerProcess, path: Path, fraction: float) -> None:
    """Rewrite the policy file and wait until the server has it in force."""
    path.with_suffix(".tmp").write_text(policy_text(fraction))
    path.with_suffix(".tmp").replace(path)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.SparseServeStub(channel)
        deadline = time.monotonic() + 10
        while True:
            route = stub.GetTrafficPolicy(service_pb2.GetTrafficPolicyRequest(family=FAMILY))
            if route.families[0].shadow.fraction == fraction and not route.error:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"policy with fraction {fraction} not applied: {route}")
            time.sleep(0.02)


def shadow_counts(server: ServerProcess) -> dict[str, float]:
    """The server's shadow runs of pruned90 against dense, by outcome (its metrics)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    counts = {"compared": 0.0, "dropped": 0.0, "error": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "sparseserve_shadow_runs_total"
                and sample.labels.get("variant") == "pruned90"
            ):
                counts[sample.labels["outcome"]] = sample.value
    return counts


def settle(server: ServerProcess) -> dict[str, float]:
    """Wait until the shadow queue has drained (the counts stop moving)."""
    last = shadow_counts(server)
    while True:
        time.sleep(0.2)
        now = shadow_counts(server)
        if now == last:
            return now
        last = now


async def warm_up(server: ServerProcess, concurrency: int, inputs: list) -> None:
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        await drive_unary(client, inputs, concurrency, 200, 5.0, model=FAMILY)


async def one_run(
    server: ServerProcess, concurrency: int, requests: int, seconds: float, inputs: list
) -> dict[str, Any]:
    async with triton_aio.InferenceServerClient(server.grpc_url) as client:
        started = time.perf_counter()
        latencies, errors = await drive_unary(
            client, inputs, concurrency, requests, seconds, model=FAMILY
        )
        wall = time.perf_counter() - started
    check_errors(errors, len(latencies) + len(errors), f"fraction run c={concurrency}")
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / wall,
        "p50_us": latencies[len(latencies) // 2] / 1e3,
        "p99_us": latencies[int(len(latencies) * 0.99)] / 1e3,
        "mean_us": statistics.fmean(latencies) / 1e3,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    inputs = triton_inputs(random_inputs(256, seed=0))
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        root = build_repository(Path(tmp) / "models")
        policy = Path(tmp) / "traffic.yaml"
        policy.write_text(policy_text(0.0))
        env = {"SPARSESERVE_TRAFFIC__RELOAD_INTERVAL_SECONDS": "0.05"}
        with ServerProcess(root, "--traffic-policy", str(policy), env=env) as server:
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    for fraction in rotated(FRACTIONS, round_index):
                        apply_policy(server, policy, fraction)
                        asyncio.run(warm_up(server, concurrency, inputs))
                        before = settle(server)
                        result = asyncio.run(
                            one_run(server, concurrency, args.requests, args.seconds, inputs)
                        )
                        after = settle(server)
                        result.update(
                            round=round_index,
                            concurrency=concurrency,
                            fraction=fraction,
                            shadow={k: after[k] - before[k] for k in after},
                        )
                        runs.append(result)
                        print(
                            f"round {round_index} c={concurrency} fraction {fraction}: "
                            f"p50 {result['p50_us']:.0f} us, {result['req_per_s']:.0f} req/s, "
                            f"shadow {result['shadow']}",
                            file=sys.stderr,
                        )
    settings = {**vars(args), "out": str(args.out)}
    load = {"before": load_before, "after": os.getloadavg()}  # others share this machine
    return {"environment": environment(), "settings": settings, "runs": runs, "loadavg": load}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    runs = report["runs"]
    for concurrency in sorted({r["concurrency"] for r in runs}):
        level = [r for r in runs if r["concurrency"] == concurrency]
        by = {f: [r for r in level if r["fraction"] == f] for f in FRACTIONS}
        ratios = {
            key: statistics.median(b[key] / a[key] for a, b in zip(by[0.0], by[1.0], strict=True))
            for key in ("p50_us", "p99_us", "req_per_s")
        }
        summary[str(concurrency)] = {
            "median": {
                str(f): {
                    key: statistics.median(r[key] for r in by[f])
                    for key in ("p50_us", "p99_us", "req_per_s")
                }
                for f in FRACTIONS
            },
            "ratio_fraction1_over_0": ratios,
            "shadow_runs_at_fraction_1": {
                outcome: sum(r["shadow"][outcome] for r in by[1.0])
                for outcome in ("compared", "dropped", "error")
            },
            "requests_at_fraction_1": sum(r["requests"] for r in by[1.0]),
        }
    return summary


def render(report: dict[str, Any]) -> str:
    rows = []
    for concurrency, level in report["summary"].items():
        median, ratio = level["median"], level["ratio_fraction1_over_0"]
        shadows = level["shadow_runs_at_fraction_1"]
        rows.append(
            [
                concurrency,
                f"{median['0.0']['p50_us']:.0f} / {median['0.0']['p99_us']:.0f}",
                f"{median['1.0']['p50_us']:.0f} / {median['1.0']['p99_us']:.0f}",
                f"{ratio['p50_us']:.2f}x / {ratio['p99_us']:.2f}x",
                f"{median['0.0']['req_per_s']:.0f} -> {median['1.0']['req_per_s']:.0f}",
                f"{shadows['compared']:.0f} / {shadows['dropped']:.0f} / {shadows['error']:.0f}"
                f" of {level['requests_at_fraction_1']}",
            ]
        )
    table = markdown_table(
        [
            "concurrency",
            "fraction 0: p50 / p99 µs",
            "fraction 1: p50 / p99 µs",
            "ratio p50 / p99",
            "req/s",
            "shadow runs compared / dropped / error",
        ],
        rows,
    )
    settings = report["settings"]
    return "\n".join(
        [
            "# Shadow traffic: what it costs the primary request",
            "",
            "Family `bench` (mlp_small, dense answers, `pruned90` shadows). Batch-1 unary "
            f"ModelInfer naming the family; {settings['rounds']} rounds, each running both "
            "fractions in alternating order; medians over rounds, ratios taken within a "
            "round. `bench/shadow.py`.",
            "",
            *table,
            "",
            *machine_lines(
                report["environment"],
                [
                    "- load average (1 min) before / after: "
                    f"{report['loadavg']['before'][0]:.1f} / {report['loadavg']['after'][0]:.1f}"
                ],
            ),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=3000, help="per run, at most")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run, at most")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = run(args)
    report["summary"] = summarize(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "shadow.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
