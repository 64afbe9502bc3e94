"""Does least-squares reconstruction after the structured cut move MiniLM's fidelity?

The `minilm.structured` cut (50% of FFN neurons, 25% of heads, activation importance,
one shot) on the recipe's data (`english-mix`, `fortunes-literature` held out), measured
on held-out chunks and on the held-out source: one-shot, one-shot + reconstruction
(`sparsify/reconstruct.py`), and each of those after `--steps` steps of the recipe's
layer-wise distillation, so that the two starting points are compared at equal cost.

    .venv/bin/python -m bench.reconstruct_explore --steps 100

Writes bench/results/reconstruct_explore.{json,md}. An exploration: one seed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.minilm_setup import Fidelities, as_torch, fidelity_cells, recipe_data
from bench.report import environment, machine_lines, markdown_table, progress, write_results
from sparseserve.sparsify.distill import DistillConfig, DistillLoss, distill
from sparseserve.sparsify.layerwise import LayerwiseConfig
from sparseserve.sparsify.recipe import head
from sparseserve.sparsify.reconstruct import reconstruct
from sparseserve.sparsify.transformer import (
    EncoderPruneConfig,
    Importance,
    ReconstructConfig,
    prune_encoder,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="distillation steps per arm")
    parser.add_argument("--learning-rate", type=float, nargs="+", default=[2e-4])
    parser.add_argument("--calibration", type=int, default=512, help="calibration chunks")
    parser.add_argument("--test-samples", type=int, default=500)
    parser.add_argument("--ridge", type=float, nargs="+", default=[1e-3])
    parser.add_argument(
        "--refit-after",
        action="store_true",
        help="after each distillation, refit the output maps again and measure",
    )
    parser.add_argument(
        "--arms", nargs="+", default=["one-shot", "refit", "obs"],
        choices=["one-shot", "refit", "obs"], help="which starting points to build",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    teacher, data = recipe_data(args.test_samples)
    progress(f"data read in {time.perf_counter() - started:.0f} s")
    measure = Fidelities.of(teacher, data).measure

    calibration = as_torch(head(data.x_train, args.calibration))
    starts: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, model: torch.nn.Module, tic: float, **extra: Any) -> None:
        starts[name] = model
        rows[name] = {"fidelity": measure(model), "seconds": time.perf_counter() - tic, **extra}
        progress(f"{name}: {rows[name]['fidelity']} in {rows[name]['seconds']:.0f} s")

    prune = EncoderPruneConfig(
        ffn_fraction=0.5, head_fraction=0.25, importance=Importance.activation
    )
    tic = time.perf_counter()
    one_shot = copy.deepcopy(teacher)
    prune_encoder(one_shot, prune, calibration)
    if "one-shot" in args.arms:
        add("one-shot (activation importance)", one_shot, tic)
    for ridge in args.ridge:
        if "refit" in args.arms:
            tic = time.perf_counter()
            model = copy.deepcopy(one_shot)
            fits = reconstruct(model, teacher, calibration, ridge=ridge)
            add(
                f"activation importance + refit (ridge {ridge:g})", model, tic,
                fits=[asdict(f) for f in fits],
            )  # fmt: skip
        if "obs" in args.arms:
            tic = time.perf_counter()
            model = copy.deepcopy(teacher)
            obs = prune.model_copy(
                update={
                    "importance": Importance.reconstruction,
                    "reconstruct": ReconstructConfig(ridge=ridge),
                }
            )
            prune_encoder(model, obs, calibration, teacher=teacher)
            add(f"reconstruction importance + refit (ridge {ridge:g})", model, tic)
    configs = [
        DistillConfig(
            steps=max(args.steps, 1),
            learning_rate=rate,
            loss=DistillLoss.cosine_mse,
            log_every=25,
            freeze=("bert.embeddings",),
            layerwise=LayerwiseConfig(relation_heads=16),
            device="cpu",  # its timings are of the CPU, also on a machine with a GPU
        )
        for rate in args.learning_rate
    ]
    if args.steps:
        train = as_torch(data.x_train)
        for name, start in list(starts.items()):
            for config in configs:
                model = copy.deepcopy(start) if len(configs) > 1 else start
                tic = time.perf_counter()
                distill(teacher, model, train, config, progress=progress)
                label = f"{name}, then {args.steps} steps at lr {config.learning_rate:g}"
                rows[label] = {"fidelity": measure(model), "seconds": time.perf_counter() - tic}
                progress(f"{label}: {rows[label]['fidelity']}")
                if args.refit_after:
                    tic = time.perf_counter()
                    reconstruct(model, teacher, calibration, ridge=args.ridge[0])
                    label = f"{label}, refitted again"
                    rows[label] = {
                        "fidelity": measure(model),
                        "seconds": time.perf_counter() - tic,
                    }
                    progress(f"{label}: {rows[label]['fidelity']}")

    report = {
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "prune": prune.model_dump(mode="json"),
        "distill": [config.model_dump(mode="json") for config in configs],
        "calibration_chunks": args.calibration,
        "rows": {
            name: {**row, "fidelity": {k: asdict(v) for k, v in row["fidelity"].items()}}
            for name, row in rows.items()
        },
    }
    table = [
        (name, *fidelity_cells(row["fidelity"]), f"{row.get('seconds', 0):.0f}")
        for name, row in rows.items()
    ]
    markdown = "\n".join(
        [
            "# Least-squares reconstruction after MiniLM's structured cut",
            "",
            f"50% FFN neurons + 25% heads cut at once ({args.calibration} calibration "
            f"chunks); fidelity to the dense model on {args.test_samples} held-out chunks "
            f"/ the never-trained fortunes-literature; distillation: {args.steps} steps of "
            "32, layer-wise, at each learning rate. One seed.",
            "",
            *markdown_table(
                ("stage", "cosine mean (chunks / literature)", "cosine min", "top-1", "s"),
                table,
            ),
            "",
            *machine_lines(report["environment"]),
            "",
        ]
    )
    write_results(args.output_dir, "reconstruct_explore", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
