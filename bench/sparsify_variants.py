"""onnxruntime latency of every variant of a sparsified repository, in-process.

The server adds ~0.7 ms of gRPC to each call (see the demo's table), which hides what a
variant changes in the model itself; this measures the model alone: CPU, one intra-op
thread, full graph optimization (the server's defaults), batch 1 and batch 64. In each
round every variant runs a block of back-to-back runs (as a served model would, with
its weights in cache; taking turns run by run among 13 models measured cache misses,
not the models), in an order rotated between rounds so that drift on this shared
machine hits all alike. The median of each round's median is reported, and each
variant's ratio to its family's baseline is taken within each round.

    python bench/sparsify_variants.py --repository models

Writes bench/results/sparsify_variants.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import environment, machine_lines, markdown_table
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest

RESULTS = Path(__file__).resolve().parent / "results"


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(repository: Path, batch: int, runs: int, rounds: int) -> dict[str, Any]:
    models = sorted(p.name for p in repository.iterdir() if (p / MANIFEST_FILENAME).is_file())
    manifests = {m: VariantManifest.read(repository / m / MANIFEST_FILENAME) for m in models}
    sessions = {m: session(repository / m / "1" / "model.onnx") for m in models}
    rng = np.random.default_rng(0)
    feeds = {}
    for name, s in sessions.items():
        (spec,) = s.get_inputs()
        feeds[name] = {spec.name: rng.random((batch, *spec.shape[1:]), dtype=np.float32)}
        for _ in range(50):
            s.run(None, feeds[name])
    medians: dict[str, list[float]] = {m: [] for m in models}
    for round_index in range(rounds):
        shift = round_index % len(models)
        for name in models[shift:] + models[:shift]:
            s, feed = sessions[name], feeds[name]
            for _ in range(20):  # back in cache after the previous model
                s.run(None, feed)
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                s.run(None, feed)
                times.append(time.perf_counter() - started)
            medians[name].append(statistics.median(times) * 1e6)
    result = {}
    for name in models:
        baseline = manifests[name].baseline or name
        ratios = [v / b for v, b in zip(medians[name], medians[baseline], strict=True)]
        result[name] = {
            "median_us": statistics.median(medians[name]),
            "ratio_to_baseline": statistics.median(ratios),
            "file_bytes": manifests[name].file_bytes,
            "method": manifests[name].method,
        }
    return {"batch": batch, "runs_per_round": runs, "rounds": rounds, "models": result}


def render(report: dict[str, Any]) -> str:
    lines = ["# Variant latency in onnxruntime (in-process, no server)", ""]
    lines += machine_lines(report["environment"])
    lines += ["", "µs per run, median of round medians; ratio to the family's dense baseline.", ""]
    one, many = report["levels"]
    rows = [
        (name, f"{one['models'][name]['median_us']:.1f}",
         f"{one['models'][name]['ratio_to_baseline']:.2f}",
         f"{many['models'][name]['median_us']:.1f}",
         f"{many['models'][name]['ratio_to_baseline']:.2f}")
        for name in one["models"]
    ]  # fmt: skip
    lines += markdown_table(
        ("model", "batch 1 µs", "vs dense", f"batch {many['batch']} µs", "vs dense"), rows
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=1000, help="batch-1 runs per round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = {
        "environment": environment(),
        "repository": str(args.repository),
        "levels": [
            measure(args.repository, 1, args.runs, args.rounds),
            measure(args.repository, 64, max(1, args.runs // 10), args.rounds),
        ],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "sparsify_variants.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "sparsify_variants.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
