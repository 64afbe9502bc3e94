"""Does layer-wise distillation move the number? One short run on the real MiniLM.

The setting of ``bench/results/minilm_importance.md`` (the previous recipe's data: the
standard library's docstrings, the first 320 training chunks and 200 held-out chunks;
50% of FFN neurons and 25% of heads cut at once by activation importance; 20 steps of
batch 32, lr 2e-4, cosine + MSE, embeddings frozen), with the layer-wise terms added. That
file recorded 0.6923 one-shot and 0.8086 after the 20 output-only steps (mean cosine to
the dense model on the held-out chunks).

    nice -n 19 .venv/bin/python bench/distill_explore.py --steps 20

Writes ``bench/results/distill_explore.{json,md}``. An exploration, not a result: one
seed, few steps.
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

from bench.report import environment, write_results
from sparseserve.sparsify.catalog import architecture, load_data
from sparseserve.sparsify.distill import DistillConfig, DistillLoss, distill
from sparseserve.sparsify.export import run_torch
from sparseserve.sparsify.layerwise import LayerwiseConfig
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.recipe import DataConfig, head
from sparseserve.sparsify.transformer import (
    EncoderPruneConfig,
    Importance,
    prune_encoder,
)

RESULTS = Path(__file__).resolve().parent / "results"
RECORDED = {"one_shot": 0.6923, "output_only_distilled": 0.8086}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = architecture("all-minilm-l6-v2")
    data = load_data(
        DataConfig(
            source="stdlib-docstrings",
            test_fraction=0.1,
            batch_size=32,
            train_samples=320,
            test_samples=200,
        ),
        arch,
    )

    def as_torch(feeds: list) -> list[dict[str, torch.Tensor]]:
        return [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds]

    teacher = arch.build()
    dense = run_torch(teacher, data.x_test)
    student = copy.deepcopy(teacher)
    prune = EncoderPruneConfig(
        ffn_fraction=0.5, head_fraction=0.25, importance=Importance.activation
    )
    prune_encoder(student, prune, as_torch(head(data.x_train, 512)))
    one_shot = fidelity(dense, run_torch(student, data.x_test))
    print(f"one-shot: {one_shot}", flush=True)
    config = DistillConfig(
        steps=args.steps,
        learning_rate=2e-4,
        loss=DistillLoss.cosine_mse,
        log_every=5,
        freeze=("bert.embeddings",),
        layerwise=LayerwiseConfig(relation_heads=16),
        device="cpu",  # its timings are of the CPU, also on a machine with a GPU
    )
    result = distill(teacher, student, as_torch(data.x_train), config, progress=print)
    after = fidelity(dense, run_torch(student, data.x_test))
    print(f"layer-wise distilled: {after}", flush=True)
    report = {
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "config": config.model_dump(mode="json"),
        "prune": prune.model_dump(mode="json"),
        "one_shot": asdict(one_shot),
        "layerwise_distilled": asdict(after),
        "distill_seconds": result.seconds,
        "loss_first_last": [result.losses[0], result.losses[-1]],
        "recorded_in_minilm_importance": RECORDED,
    }
    env = report["environment"]
    markdown = "\n".join(
        [
            "# Layer-wise distillation, one short exploratory run",
            "",
            f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, shared and busy). "
            f"Command: `{env['command']}`",
            "",
            "200 held-out docstring chunks; 320 training chunks; 50% FFN + 25% heads cut "
            f"at once (activation importance); {args.steps} steps of batch 32.",
            "",
            "| stage | cos mean | cos min | top-1 |",
            "|---|---:|---:|---:|",
            f"| one-shot (this run) | {one_shot.cosine_mean:.4f} | {one_shot.cosine_min:.4f} "
            f"| {one_shot.top1_agreement:.3f} |",
            f"| output-only distilled (recorded, minilm_importance.md) | "
            f"{RECORDED['output_only_distilled']:.4f} | | |",
            f"| layer-wise distilled (this run) | {after.cosine_mean:.4f} | "
            f"{after.cosine_min:.4f} | {after.top1_agreement:.3f} |",
            "",
        ]
    )
    write_results(args.output_dir, "distill_explore", report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
