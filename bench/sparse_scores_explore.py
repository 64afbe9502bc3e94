"""Which weights to zero in MiniLM's encoder: magnitude or Wanda's activation-aware score,
per layer or per output row, one-shot (no training).

Every linear layer inside the encoder's layers is masked at each sparsity, scored by
|w| or by |w| times the norm of the input it reads on calibration chunks (Wanda: Sun
et al. 2023), with one threshold per layer or the same fraction from every output row;
fidelity to the dense model on held-out chunks of the recipe's data (`english-mix`).

    .venv/bin/python -m bench.sparse_scores_explore

Writes bench/results/sparse_scores_explore.{json,md}. An exploration: no training, one
data split.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict
from pathlib import Path

import torch

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.minilm_setup import as_torch, recipe_data
from bench.report import environment, machine_lines, markdown_table, progress, write_results
from sparseserve.sparsify.encoder_gradual import encoder_linear_layers, input_norms
from sparseserve.sparsify.export import run_torch
from sparseserve.sparsify.prune import PruneScope, magnitude_masks, set_mask
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.recipe import head

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = (
    ("magnitude", PruneScope.per_layer),
    ("magnitude", PruneScope.per_row),
    ("activation", PruneScope.per_layer),
    ("activation", PruneScope.per_row),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    parser.add_argument("--calibration", type=int, default=256, help="calibration chunks")
    parser.add_argument("--test-samples", type=int, default=300)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    teacher, data = recipe_data(args.test_samples)
    dense = run_torch(teacher, data.x_test)
    calibration = as_torch(head(data.x_train, args.calibration))
    norms = input_norms(teacher, encoder_linear_layers(teacher), calibration)
    results = []
    for sparsity in args.sparsity:
        for importance, scope in ARMS:
            model = copy.deepcopy(teacher)
            layers = encoder_linear_layers(model)
            with torch.no_grad():
                scores = norms if importance == "activation" else None
                for name, mask in magnitude_masks(layers, sparsity, scope, scores).items():
                    set_mask(layers[name], mask)
            measured = fidelity(dense, run_torch(model, data.x_test))
            results.append(
                {
                    "sparsity": sparsity,
                    "importance": importance,
                    "scope": scope.value,
                    **asdict(measured),
                }
            )
            progress(f"{sparsity:.0%} {importance} {scope.value}: {measured}")
    report = {
        "environment": environment(),
        "calibration_chunks": args.calibration,
        "results": results,
    }
    rows = []
    for sparsity in args.sparsity:
        cells = [
            f"{r['cosine_mean']:.3f} ({r['cosine_min']:.2f})"
            for r in results
            if r["sparsity"] == sparsity
        ]
        rows.append((f"{sparsity:.0%}", *cells))
    markdown = "\n".join(
        [
            "# Which encoder weights to zero: one-shot fidelity of MiniLM",
            "",
            f"Every encoder linear layer masked at once, no training; cosine mean (min) to "
            f"the dense model on {args.test_samples} held-out chunks; activation = Wanda's "
            f"|w| x input norm over {args.calibration} calibration chunks.",
            "",
            *markdown_table(("sparsity", *(f"{imp} {scope.value}" for imp, scope in ARMS)), rows),
            "",
            *machine_lines(report["environment"]),
            "",
        ]
    )
    write_results(args.output_dir, "sparse_scores_explore", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
