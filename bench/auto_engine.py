"""Does `cpu_engine: auto` ever serve a model slower than onnxruntime would?

    .venv/bin/python -m bench.auto_engine --repository models --repository /work/minilm-models
    .venv/bin/python -m bench.auto_engine --quick          # a smoke test on the MLPs

Issue 14 asks that `auto` never serve a model slower than onnxruntime (>= 0.97x, every
model of the demo and the bench). One real `sparseserve serve --cpu-engine auto` serves
each model twice: `<model>--onnxruntime`, pinned by config.pbtxt `backend: "onnxruntime"`
(the route `auto` must not lose to), and `<model>--auto`, with no engine named, so the
server times each installed engine at load and keeps the fastest (onnxruntime unless
another is more than `engine_margin` faster). Both directories link the same file.

Each round sends `--requests` batch-1 requests (tritonclient gRPC, one at a time) to each
model's two routes, in an order that alternates between rounds; the figure is the ratio
of the two p50 latencies within a round (onnxruntime's / auto's: above 1, auto is
faster), then the median over rounds. The report names the engine `auto` chose and the
warm-up medians it chose by (`sparseserve_engine_candidate_latency_seconds`).

Models: every model directory of each `--repository` (the demo's digits models, the
MiniLM variants), and the two MLPs of bench/engines.py with random weights. Inputs:
MiniLM variants get 128 tokens of real text, the others random rows shaped as their
ONNX inputs (dynamic batch 1). Writes bench/results/auto_engine.{json,md}.
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
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.engines import (
    DEFAULT_MLPS,
    Feed,
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
ROUTES = ("onnxruntime", "auto")
TARGET = 0.97  # the issue's: auto at >= 0.97x of onnxruntime on every model
ROWS = 32  # distinct inputs per model, sent in turn


@dataclass(slots=True)
class Model:
    """One model served on both routes, and what was measured of it."""

    name: str
    path: Path
    feed: Feed
    chosen: str | None = None  # the engine `auto` serves it with
    candidates: dict[str, float] = field(default_factory=dict)  # engine -> warm-up seconds
    unavailable: str | None = None
    p50_ms: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROUTES})


def route_name(model: str, route: str) -> str:
    return f"{model}--{route}"


def random_feed(path: Path, rows: int, seed: int = 0) -> Feed:
    """`rows` random rows for each input of an ONNX file (dynamic dims other than the
    batch: 1); floats normal, integers small."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    for spec in session.get_inputs():
        shape = [rows, *(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:])]
        if "float" in spec.type:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
        elif "int64" in spec.type:
            feed[spec.name] = rng.integers(0, 10, shape).astype(np.int64)
        else:
            raise ValueError(f"{path}: input {spec.name} of type {spec.type} is not supported")
    return feed


def is_minilm(path: Path) -> bool:
    from sparseserve.sparsify.minilm import INPUT_NAMES

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {spec.name for spec in session.get_inputs()} == set(INPUT_NAMES)


def collect_models(repositories: Sequence[Path], mlps: Sequence[str], workdir: Path) -> list[Model]:
    models: list[Model] = []
    minilm: list[tuple[str, Path]] = []
    for repository in repositories:
        for directory in sorted(p for p in repository.iterdir() if p.is_dir()):
            path = latest_model_file(directory)
            if path is None:
                continue
            if is_minilm(path):
                minilm.append((directory.name, path))
            else:
                models.append(Model(directory.name, path, random_feed(path, ROWS)))
    if minilm:
        from sparseserve.sparsify.minilm import load_tokenizer

        (feed,) = minilm_feeds(load_tokenizer(), minilm_texts(ROWS), ROWS)
        models += [Model(name, path, feed) for name, path in minilm]
    for spec in mlps:
        sizes = tuple(int(width) for width in spec.split("-"))
        path = onnx_models.mlp(workdir / f"mlp-{spec}.onnx", sizes=sizes)
        models.append(Model(f"mlp-{spec}", path, random_feed(path, ROWS)))
    return models


def build_repository(root: Path, models: Sequence[Model]) -> None:
    """Each model twice: pinned to onnxruntime, and with no engine named (auto)."""
    for model in models:
        for route in ROUTES:
            config = 'backend: "onnxruntime"\n' if route == "onnxruntime" else None
            link_model(root, route_name(model.name, route), model.path, config)


def read_choices(metrics_url: str, models: Sequence[Model]) -> None:
    """Which engine serves each auto route, and the candidates' warm-up medians."""
    by_name = {route_name(m.name, "auto"): m for m in models}
    for name, labels, value in metric_samples(metrics_url):
        model = by_name.get(labels.get("model", ""))
        if model is None:
            continue
        if name == "sparseserve_model_ready" and value == 1.0:
            model.chosen = labels["backend"]
        elif name == "sparseserve_engine_candidate_latency_seconds":
            model.candidates[labels["engine"]] = value


async def drive(url: str, models: Sequence[Model], args: argparse.Namespace) -> None:
    requests = {m.name: server_inputs(m.feed) for m in models}
    async with triton_aio.InferenceServerClient(url) as client:
        for index in range(args.rounds):
            for model in models:
                if model.unavailable is not None:
                    continue
                for route in rotated(ROUTES, index):
                    name = route_name(model.name, route)
                    inputs = requests[model.name]
                    await drive_unary(client, inputs, 1, args.warmup, 30.0, model=name)
                    latencies, errors = await drive_unary(
                        client, inputs, 1, args.requests, args.seconds, model=name
                    )
                    check_errors(errors, len(latencies) + len(errors), name)
                    model.p50_ms[route].append(LatencySummary.of(latencies).p50)
            progress(f"round {index + 1}/{args.rounds} done")


def summarise(models: Sequence[Model]) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        row: dict[str, Any] = {
            "model": model.name,
            "auto_chose": model.chosen,
            "candidate_warmup_ms": {k: v * 1e3 for k, v in model.candidates.items()},
            "unavailable": model.unavailable,
        }
        if model.p50_ms["auto"]:
            ratios = [
                ort_ms / auto_ms
                for ort_ms, auto_ms in zip(model.p50_ms["onnxruntime"], model.p50_ms["auto"],
                                           strict=True)
            ]  # fmt: skip
            row |= {
                "p50_ms": {r: statistics.median(v) for r, v in model.p50_ms.items()},
                "round_p50_ms": model.p50_ms,
                "auto_vs_onnxruntime": {
                    "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)
                },
                "meets_target": statistics.median(ratios) >= TARGET,
            }  # fmt: skip
        rows.append(row)
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    settings = [
        f"- {report['rounds']} rounds x {report['requests']} batch-1 requests per route "
        f"(after {report['warmup']} warm-up), c=1; server `--cpu-engine auto "
        f"--intra-op-threads {report['threads']} --inference-threads 1 --dispatch cpu`",
        f"- load average at start {report['load_average'][0]:.2f} "
        f"(at end {report['load_average_end'][0]:.2f})",
        *(f"- {note}" for note in report["notes"]),
    ]
    lines = ["# cpu_engine auto against onnxruntime, through the server", "", "## Machine", "",
             *machine_lines(env, settings), ""]  # fmt: skip
    measured = [row for row in report["rows"] if "auto_vs_onnxruntime" in row]
    chosen: dict[str, int] = {}
    for row in measured:
        chosen[row["auto_chose"]] = chosen.get(row["auto_chose"], 0) + 1
    other = [row for row in measured if row["auto_chose"] != "onnxruntime"]
    same = [row["auto_vs_onnxruntime"]["median"] for row in measured if row not in other]
    lines += [
        f"auto against onnxruntime on {len(measured)} models; auto chose "
        + ", ".join(f"{engine} for {count}" for engine, count in sorted(chosen.items()))
        + ". "
        + (
            "Where it chose another engine: "
            + ", ".join(
                f"{row['model']} {row['auto_vs_onnxruntime']['median']:.3f}" for row in other
            )
            + f" (target >= {TARGET}). "
            if other
            else ""
        )
        + (
            "Where it chose onnxruntime both routes run the same engine, so their ratio is "
            f"the measurement's noise: {min(same):.3f} to {max(same):.3f}."
            if same
            else ""
        ),
        "",
        "Ratio: onnxruntime route's p50 / auto route's p50 within a round (above 1: auto "
        "faster), median over rounds (min-max). Warm-up medians: what the server timed "
        "at load to choose.",
        "",
    ]
    table = []
    for row in report["rows"]:
        warmups = ", ".join(
            f"{engine} {ms:.3f}" for engine, ms in sorted(row["candidate_warmup_ms"].items())
        )
        if "auto_vs_onnxruntime" not in row:
            table.append([row["model"], row["auto_chose"] or "-", warmups or "-",
                          row["unavailable"] or "-", "-", "-", "-"])  # fmt: skip
            continue
        ratio = row["auto_vs_onnxruntime"]
        table.append([
            row["model"], row["auto_chose"], warmups or "-",
            f"{row['p50_ms']['onnxruntime']:.3f}", f"{row['p50_ms']['auto']:.3f}",
            f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})",
            "yes" if row["meets_target"] else "**no**",
        ])  # fmt: skip
    header = ["model", "auto chose", "warm-up ms by engine", "p50 ms onnxruntime",
              "p50 ms auto", "ratio", f">= {TARGET}"]  # fmt: skip
    lines += [*markdown_table(header, table, 3), ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, action="append", default=[],
                        help="a repository whose every model is measured; repeatable")  # fmt: skip
    parser.add_argument("--mlp", nargs="*", default=list(DEFAULT_MLPS),
                        help="MLP widths with random weights (none: no MLPs)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="--intra-op-threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="per route per round")
    parser.add_argument("--seconds", type=float, default=10.0, help="at most, per route per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests before them")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round, 10 requests")
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--name", default="auto_engine", help="file name of the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.warmup, args.seconds = 1, 10, 2, 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="auto-engine-") as tmp:
        models = collect_models(args.repository, args.mlp, Path(tmp))
        root = Path(tmp) / "models"
        build_repository(root, models)
        progress(f"{len(models)} models, each on both routes; starting the server ...")
        started = time.perf_counter()
        server_args = ["--cpu-engine", "auto", "--intra-op-threads", str(args.threads),
                       "--inference-threads", "1", "--dispatch", "cpu", "--log-level",
                       "WARNING"]  # fmt: skip
        with ServerProcess(root, *server_args, startup_timeout=900.0) as server:
            progress(f"ready in {time.perf_counter() - started:.0f} s")
            read_choices(server.metrics_url, models)
            failures = load_failures(server.grpc_url)
            for model in models:
                reasons = [
                    failures[n] for r in ROUTES if (n := route_name(model.name, r)) in failures
                ]
                if reasons:
                    model.unavailable = "did not load: " + "; ".join(reasons)
            asyncio.run(drive(server.grpc_url, models, args))
    report = {
        "environment": env,
        "threads": args.threads,
        "rounds": args.rounds,
        "requests": args.requests,
        "warmup": args.warmup,
        "notes": args.note,
        "load_average": load_at_start,
        "load_average_end": os.getloadavg(),
        "rows": summarise(models),
    }
    markdown = render_markdown(report)
    write_results(args.output_dir, args.name, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
