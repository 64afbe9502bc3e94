"""What a faster variant gains once the server runs it: each variant of a model, served
with `cpu_engine: auto`, against the onnxruntime fp32 route of the model it came from.

    .venv/bin/python -m bench.served_speedups --minilm DIR   # DIR: minilm.dense, minilm.int8-static
    .venv/bin/python -m bench.served_speedups --quick        # the MLP only, a smoke test

Issue 14's targets as a user meets them: one real `sparseserve serve --cpu-engine auto
--dispatch cpu` (one inference thread, `--intra-op-threads`), tritonclient gRPC,
batch-1 requests. Routes, each a model directory linking one file:

- MiniLM (`--minilm`; 128 tokens of real text; c=1):
  `minilm.dense--onnxruntime` (the dense file pinned to onnxruntime: the reference),
  `minilm.dense--auto`, `minilm.bf16--auto` (the same file as a bf16 variant:
  config.pbtxt `HINT_BF16: YES`, Triton's OpenVINO form), `minilm.int8-static--onnxruntime`
  and `--auto` (the NNCF static int8 file).
- The MLP (1024-4096-4096-1000, random weights; dynamic batching up to 32; c=1 and
  c=32): `mlp--onnxruntime` (the reference), `mlp--auto`, `mlp.bf16--auto`, and
  `mlp.sparse90-int8` (90% of each weight matrix zero, then static int8 by onnxruntime's
  QDQ quantization: another model, its error is the pruning's) on onnxruntime, and on
  OpenVINO without and with `CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE` 0.8: whether the
  sparse kernel runs (the layers the server counts) and what it buys.

One interleaved run: every round runs each group's routes (a family at one concurrency)
in a rotated order. Speed-up within a round: reference p50 / route p50 at c=1, route
req/s / reference req/s above it; the median over rounds (min-max). Quality: each
route's answers to the group's inputs against the reference's (cosine for MiniLM, max
relative error for the MLP). A bf16 route on a CPU that computes no bf16 does not load
(FAILED_PRECONDITION) and is reported so. Writes bench/results/served_speedups.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.engines import (
    cosine_to,
    latest_model_file,
    link_model,
    load_failures,
    minilm_feeds,
    minilm_texts,
    server_inputs,
)
from bench.measure import LatencySummary, check_errors, drive_unary, metric_samples
from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    package_version,
    progress,
    rotated,
    write_results,
)
from sparseserve.client.server_process import ServerProcess
from sparseserve.testing import onnx_models

PACKAGES = ("sparseserve", "onnxruntime", "openvino", "numpy", "tritonclient", "grpcio")
MLP_SIZES = (1024, 4096, 4096, 1000)
ROWS = 32  # distinct inputs per family, sent in turn
BATCHING = "max_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 500 }\n"
BF16 = 'parameters: { key: "HINT_BF16" value: { string_value: "YES" } }\n'
SPARSE_RATE = 0.8
# The targets: (family, route, concurrency, speed-up at least, quality bound).
TARGETS = (
    ("minilm", "minilm.bf16--auto", 1, 3.0, ("cosine_mean", 0.999)),
    ("minilm", "minilm.int8-static--auto", 1, 3.5, ("cosine_mean", 0.995)),
    ("minilm", "minilm.int8-static-bf16--auto", 1, 3.5, ("cosine_mean", 0.995)),
    ("mlp", "mlp.bf16--auto", 32, 2.0, None),
)


@dataclass(slots=True)
class Route:
    """One model directory: a file served under one config."""

    name: str
    family: str
    path: Path
    config: str
    what: str
    reference: bool = False
    served_by: str | None = None  # the backend label of sparseserve_model_ready
    precision: str | None = None
    sparse_kernel_layers: int | None = None
    candidates: dict[str, float] = field(default_factory=dict)  # engine -> warm-up seconds
    unavailable: str | None = None
    quality: dict[str, float] = field(default_factory=dict)
    p50_ms: dict[int, list[float]] = field(default_factory=dict)  # concurrency -> per round
    per_second: dict[int, list[float]] = field(default_factory=dict)


def minilm_routes(directory: Path) -> list[Route]:
    dense = latest_model_file(directory / "minilm.dense")
    if dense is None:
        raise SystemExit(f"{directory}/minilm.dense: no model.onnx")
    routes = [
        Route("minilm.dense--onnxruntime", "minilm", dense, 'backend: "onnxruntime"\n',
              "dense fp32, pinned to onnxruntime", reference=True),
        Route("minilm.dense--auto", "minilm", dense, "", "dense fp32, auto"),
        Route("minilm.bf16--auto", "minilm", dense, BF16, "the dense file as a bf16 variant, auto"),
    ]  # fmt: skip
    static = latest_model_file(directory / "minilm.int8-static")
    if static is not None:
        routes += [
            Route("minilm.int8-static--onnxruntime", "minilm", static,
                  'backend: "onnxruntime"\n', "NNCF static int8, pinned to onnxruntime"),
            Route("minilm.int8-static--auto", "minilm", static, "", "NNCF static int8, auto"),
            Route("minilm.int8-static-bf16--auto", "minilm", static, BF16,
                  "NNCF static int8 as a bf16 variant (bf16 where it is not int8), auto"),
        ]  # fmt: skip
    else:
        progress(f"{directory}/minilm.int8-static: no model.onnx (skipped)")
    return routes


def mlp_routes(workdir: Path, sizes: Sequence[int]) -> list[Route]:
    dense = onnx_models.mlp(workdir / "mlp.onnx", sizes=sizes)
    sparse = onnx_models.static_int8_mlp(workdir / "mlp-sparse-int8.onnx", sizes, 0.9)
    rate = (
        'parameters: { key: "CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE" '
        f'value: {{ string_value: "{SPARSE_RATE}" }} }}\n'
    )
    return [
        Route("mlp--onnxruntime", "mlp", dense, 'backend: "onnxruntime"\n' + BATCHING,
              "fp32, pinned to onnxruntime", reference=True),
        Route("mlp--auto", "mlp", dense, BATCHING, "fp32, auto"),
        Route("mlp.bf16--auto", "mlp", dense, BF16 + BATCHING, "the file as a bf16 variant, auto"),
        Route("mlp.sparse90-int8--onnxruntime", "mlp", sparse,
              'backend: "onnxruntime"\n' + BATCHING, "90% zero, static int8, onnxruntime"),
        Route("mlp.sparse90-int8--openvino", "mlp", sparse, 'backend: "openvino"\n' + BATCHING,
              "90% zero, static int8, OpenVINO"),
        Route("mlp.sparse90-int8--openvino-sparse", "mlp", sparse,
              'backend: "openvino"\n' + rate + BATCHING,
              f"90% zero, static int8, OpenVINO, sparse rate {SPARSE_RATE}"),
    ]  # fmt: skip


def build_repository(root: Path, routes: Sequence[Route]) -> None:
    for route in routes:
        link_model(root, route.name, route.path, route.config)


def read_serving(url: str, routes: Sequence[Route]) -> None:
    """Which backend serves each route, in what precision, on how many sparse-kernel
    layers, and the candidates `auto` timed."""
    by_name = {route.name: route for route in routes}
    for name, labels, value in metric_samples(url):
        route = by_name.get(labels.get("model", ""))
        if route is None:
            continue
        if name == "sparseserve_model_ready" and value == 1.0:
            route.served_by = labels["backend"]
        elif name == "sparseserve_model_info":
            route.precision = labels.get("precision")
        elif name == "sparseserve_model_sparse_kernel_layers":
            route.sparse_kernel_layers = int(value)
        elif name == "sparseserve_engine_candidate_latency_seconds":
            route.candidates[labels["engine"]] = value


async def first_outputs(
    client: triton_aio.InferenceServerClient, route: Route, inputs: list[Any]
) -> np.ndarray:
    rows = []
    for request in inputs:
        result = await client.infer(route.name, request)
        rows.append(result.as_numpy(result.get_response().outputs[0].name))
    return np.concatenate(rows)


def quality(family: str, reference: np.ndarray, answers: np.ndarray) -> dict[str, float]:
    if family == "minilm":
        return cosine_to(reference, answers)
    scale = max(float(np.abs(reference).max()), 1e-30)
    return {"relative_error": float(np.abs(answers - reference).max()) / scale}


async def measure(
    url: str, groups: dict[tuple[str, int], list[Route]], inputs: dict[str, list[Any]],
    args: argparse.Namespace,
) -> None:  # fmt: skip
    async with triton_aio.InferenceServerClient(url) as client:
        families = {family for family, _ in groups}
        for family in families:
            members = [r for r in next(g for (f, _), g in groups.items() if f == family)]
            reference = next(r for r in members if r.reference)
            expected = await first_outputs(client, reference, inputs[family])
            for route in members:
                route.quality = quality(family, expected, await first_outputs(
                    client, route, inputs[family]))  # fmt: skip
        for index in range(args.rounds):
            for (family, concurrency), members in groups.items():
                for route in rotated(members, index):
                    requests = inputs[family]
                    await drive_unary(client, requests, concurrency, concurrency * args.warmup,
                                      30.0, model=route.name)  # fmt: skip
                    count = args.requests if concurrency == 1 else 10**9
                    seconds = args.seconds if concurrency == 1 else args.batched_seconds
                    started = time.perf_counter()
                    latencies, errors = await drive_unary(
                        client, requests, concurrency, count, seconds, model=route.name
                    )
                    elapsed = time.perf_counter() - started
                    check_errors(errors, len(latencies) + len(errors), route.name)
                    route.p50_ms.setdefault(concurrency, []).append(
                        LatencySummary.of(latencies).p50
                    )
                    route.per_second.setdefault(concurrency, []).append(len(latencies) / elapsed)
                progress(
                    f"round {index + 1}/{args.rounds} {family} c={concurrency}: "
                    + ", ".join(f"{r.name} {r.p50_ms[concurrency][-1]:.2f} ms "
                                f"{r.per_second[concurrency][-1]:.0f}/s" for r in members)
                )  # fmt: skip


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(
    routes: Sequence[Route], groups: dict[tuple[str, int], list[Route]]
) -> list[dict[str, Any]]:
    rows = []
    for (family, concurrency), members in groups.items():
        reference = next(r for r in members if r.reference)
        for route in members:
            mine, theirs = route.p50_ms[concurrency], reference.p50_ms[concurrency]
            if concurrency == 1:
                ratios = [t / m for m, t in zip(mine, theirs, strict=True)]
            else:
                served = zip(route.per_second[concurrency], reference.per_second[concurrency],
                             strict=True)  # fmt: skip
                ratios = [m / t for m, t in served]
            rows.append({
                "family": family, "route": route.name, "what": route.what,
                "concurrency": concurrency, "served_by": route.served_by,
                "precision": route.precision, "sparse_kernel_layers": route.sparse_kernel_layers,
                "candidate_warmup_ms": {k: v * 1e3 for k, v in route.candidates.items()},
                "quality": route.quality,
                "p50_ms": statistics.median(mine),
                "requests_per_second": statistics.median(route.per_second[concurrency]),
                "round_p50_ms": mine,
                "round_requests_per_second": route.per_second[concurrency],
                "speedup": spread(ratios),
            })  # fmt: skip
    for route in routes:
        if route.unavailable is not None:
            rows.append({"family": route.family, "route": route.name, "what": route.what,
                         "unavailable": route.unavailable})  # fmt: skip
    return rows


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for family, route, concurrency, at_least, bound in TARGETS:
        row = next(
            (r for r in rows if r["route"] == route and r.get("concurrency") == concurrency),
            None,
        )
        unavailable = next((r["unavailable"] for r in rows
                            if r["route"] == route and "unavailable" in r), None)  # fmt: skip
        if row is None and unavailable is None:
            continue  # not in this run (no --minilm)
        result: dict[str, Any] = {"family": family, "route": route, "concurrency": concurrency,
                                  "speedup_at_least": at_least, "quality_bound": bound}  # fmt: skip
        if row is None:
            result |= {"met": False, "why": unavailable}
        else:
            speed = row["speedup"]["median"]
            good = bound is None or row["quality"].get(bound[0], 0.0) >= bound[1]
            result |= {"speedup": speed, "quality": row["quality"],
                       "met": speed >= at_least and good}  # fmt: skip
        results.append(result)
    return results


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    settings = [
        f"- one server: `sparseserve serve --cpu-engine auto --intra-op-threads "
        f"{report['threads']} --inference-threads 1 --dispatch cpu`"
        + (
            f" on CPUs {report['server_cpus']} (the load generator on others)"
            if report["server_cpus"]
            else ""
        )
        + f"; {report['rounds']} rounds; "
        f"c=1: {report['requests']} requests per route per round; c>1: "
        f"{report['batched_seconds']} s per route per round",
        f"- load average at start {report['load_average'][0]:.2f} "
        f"(at end {report['load_average_end'][0]:.2f})",
        *(f"- {note}" for note in report["notes"]),
    ]
    lines = ["# Faster variants through the server: `auto` against onnxruntime fp32", "",
             "## Machine", "", *machine_lines(env, settings), "",
             "## The issue's targets", ""]  # fmt: skip
    for target in report["targets"]:
        bound = target["quality_bound"]
        wanted = f">= {target['speedup_at_least']}x" + (
            f", {bound[0]} >= {bound[1]}" if bound else ""
        )
        if "speedup" in target:
            got = f"{target['speedup']:.2f}x" + "".join(
                f", {k} {v:.4f}" for k, v in target["quality"].items()
            )
        else:
            got = f"not measured: {target['why']}"
        lines.append(f"- {target['route']} at c={target['concurrency']}: {got} "
                     f"(target {wanted}): **{'met' if target['met'] else 'not met'}**")  # fmt: skip
    lines += [
        "",
        "## Every route",
        "",
        "Speed-up: against the family's reference route (the first of each group) within a "
        "round, median over rounds (min-max); at c=1 by p50 latency, above it by requests "
        "per second. Quality: the route's answers against the reference's on the same "
        f"{ROWS} inputs. Served by / precision / sparse-kernel layers: the server's metrics.",
        "",
    ]
    table = []
    for row in report["rows"]:
        if "unavailable" in row:
            table.append([row["route"], row["what"], "-", "-", "-", "-", "-",
                          f"did not load: {row['unavailable']}"])  # fmt: skip
            continue
        speed = row["speedup"]
        table.append([
            row["route"], row["what"], row["concurrency"],
            f"{row['served_by']} {row['precision']}", row["sparse_kernel_layers"],
            f"{row['p50_ms']:.3f} ms, {row['requests_per_second']:.0f}/s",
            f"{speed['median']:.2f}x ({speed['min']:.2f}-{speed['max']:.2f})",
            ", ".join(f"{k} {v:.4g}" for k, v in row["quality"].items()),
        ])  # fmt: skip
    header = ["route", "what", "c", "served by", "sparse-kernel layers", "p50, req/s",
              "speed-up", "quality"]  # fmt: skip
    lines += [*markdown_table(header, table, 2), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minilm", type=Path, help="a repository with minilm.dense "
                        "(and minilm.int8-static)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="--intra-op-threads")
    parser.add_argument("--server-cpus", help="taskset -c list for the server (default: "
                        "where this process may run, with the load generator)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60, help="c=1: per route per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="c=1: at most, per route")
    parser.add_argument("--batched-seconds", type=float, default=3.0, help="c>1: per route")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per worker")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round, short")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="served_speedups", help="file name of the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.warmup, args.batched_seconds = 1, 8, 1, 0.5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    load_at_start = os.getloadavg()
    sizes = (64, 256, 256, 10) if args.quick else MLP_SIZES
    with tempfile.TemporaryDirectory(prefix="served-speedups-") as tmp:
        workdir = Path(tmp)
        routes = mlp_routes(workdir, sizes)
        inputs: dict[str, list[Any]] = {}
        rng = np.random.default_rng(0)
        inputs["mlp"] = server_inputs(
            {"input": rng.standard_normal((ROWS, sizes[0])).astype(np.float32)}
        )
        if args.minilm is not None:
            from sparseserve.sparsify.minilm import load_tokenizer

            routes = minilm_routes(args.minilm) + routes
            (feed,) = minilm_feeds(load_tokenizer(), minilm_texts(ROWS), ROWS)
            inputs["minilm"] = server_inputs(feed)
        build_repository(workdir / "models", routes)
        progress(f"{len(routes)} routes; starting the server ...")
        started = time.perf_counter()
        server_args = ["--cpu-engine", "auto", "--intra-op-threads", str(args.threads),
                       "--inference-threads", "1", "--dispatch", "cpu"]  # fmt: skip
        with ServerProcess(
            workdir / "models", *server_args, cpu=args.server_cpus, startup_timeout=900.0
        ) as server:
            progress(f"ready in {time.perf_counter() - started:.0f} s")
            read_serving(server.metrics_url, routes)
            failures = load_failures(server.grpc_url)
            for route in routes:
                if route.served_by is None:
                    route.unavailable = failures.get(route.name, "not ready, no reason given")
            served = [route for route in routes if route.unavailable is None]
            groups: dict[tuple[str, int], list[Route]] = {}
            for route in served:
                for concurrency in (1,) if route.family == "minilm" else (1, 32):
                    groups.setdefault((route.family, concurrency), []).append(route)
            for key, members in groups.items():
                if not any(route.reference for route in members):
                    raise SystemExit(f"{key}: the reference route did not load:\n{server.log()}")
            asyncio.run(measure(server.grpc_url, groups, inputs, args))
            server_log = server.log()
    rows = summarise(routes, groups)
    report = {
        "environment": env,
        "threads": args.threads,
        "server_cpus": args.server_cpus,
        "rounds": args.rounds,
        "requests": args.requests,
        "batched_seconds": args.batched_seconds,
        "notes": args.note,
        "load_average": load_at_start,
        "load_average_end": os.getloadavg(),
        "rows": rows,
        "targets": check_targets(rows),
        "server_load_lines": [line for line in server_log.splitlines()
                              if "compiled" in line or "serving with" in line][:100],
    }  # fmt: skip
    write_results(args.output_dir, args.name, report, render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
