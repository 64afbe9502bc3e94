"""Distillation speed on the real all-MiniLM-L6-v2: steps per second, before and after.

Each setting runs a fixed number of distillation steps (default 10, batch 32) of a
structured-pruned student (50% FFN, 25% heads) towards the dense model, on the previous
recipe's text (the standard library's docstrings, chunks of <= 32 words), and the settings take
turns within each round so that a busy machine slows them alike:

- ``before``: what the recipe did until now: fp32, batches in shuffled order, the
  embedding loss only;
- ``sorted``: batches cut from length-sorted windows of 16 batches (less padding);
- ``sorted+layerwise``: the same plus the layer-wise terms (what the new recipe runs);
- ``sorted+layerwise+bf16``: forced bf16 autocast (fast only on CPUs with AVX512-BF16 or
  AMX; elsewhere emulated, and the report says which this CPU is).

    nice -n 19 .venv/bin/python bench/distill_speed.py --steps 10 --rounds 2

Times are CPU seconds of the process on one torch thread (`--threads 1`, the default): on
a machine shared with other work, wall time measures the scheduler; CPU time measures the
step. A build uses both cores, so its steps take about half the CPU time in wall time
when the machine is idle.

Writes ``bench/results/distill_speed.{json,md}`` with the machine, versions and command.
The teacher runs on every step, as in a build: the recipe's corpus is larger than the
number of steps, so no batch comes round twice and the teacher cache never hits.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import environment, package_version, write_results
from sparseserve.backends.hardware import cpu_features, cpu_has_bf16
from sparseserve.sparsify.corpus import RECIPE_CHUNK_WORDS, length_sorted, stdlib_corpus
from sparseserve.sparsify.distill import (
    DistillConfig,
    DistillLoss,
    Precision,
    TrainDevice,
    distill,
)
from sparseserve.sparsify.layerwise import LayerwiseConfig
from sparseserve.sparsify.minilm import SentenceEmbedder, encode, load_bert, load_tokenizer
from sparseserve.sparsify.transformer import EncoderPruneConfig, prune_encoder

RESULTS = Path(__file__).resolve().parent / "results"
SORT_WINDOW_BATCHES = 16


def _batches(tokenizer: Any, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {k: torch.from_numpy(v) for k, v in encode(tokenizer, texts[i : i + size]).items()}
        for i in range(0, len(texts), size)
    ]


def _padding(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return {"padded_fraction": round(1 - real / total, 4), "tokens_per_batch": total / len(batches)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="distill_speed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    corpus = stdlib_corpus(max_words=RECIPE_CHUNK_WORDS)
    texts = list(corpus.train)
    random.Random(0).shuffle(texts)
    needed = args.steps * args.batch_size * (args.rounds + 1)
    texts = texts[:needed]
    tokenizer = load_tokenizer()
    shuffled = _batches(tokenizer, texts, args.batch_size)
    ordered = _batches(
        tokenizer, length_sorted(texts, SORT_WINDOW_BATCHES * args.batch_size), args.batch_size
    )
    teacher = SentenceEmbedder(load_bert()).eval()
    student_start = copy.deepcopy(teacher)
    prune_encoder(student_start.bert, EncoderPruneConfig(ffn_fraction=0.5, head_fraction=0.25))

    layerwise = LayerwiseConfig(relation_heads=16)
    base = DistillConfig(
        steps=args.steps,
        learning_rate=2e-4,
        loss=DistillLoss.cosine_mse,
        freeze=("bert.embeddings",),
        precision=Precision.fp32,
        device=TrainDevice.cpu,  # a CPU benchmark, also on a machine with a GPU
        cache_teacher=False,
        log_every=10_000,
    )
    settings: dict[str, tuple[DistillConfig, list[dict[str, torch.Tensor]]]] = {
        "before": (base, shuffled),
        "sorted": (base, ordered),
        "sorted+layerwise": (base.model_copy(update={"layerwise": layerwise}), ordered),
        "sorted+layerwise+bf16": (
            base.model_copy(update={"layerwise": layerwise, "precision": Precision.bf16}),
            ordered,
        ),
    }
    # One untimed step each: first calls pay for lazy initialisation.
    for config, batches in settings.values():
        distill(teacher, copy.deepcopy(student_start), batches[:1], config.model_copy(
            update={"steps": 1}))  # fmt: skip

    seconds: dict[str, list[float]] = {name: [] for name in settings}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in settings}
    names = list(settings)
    for round_index in range(args.rounds):
        # The same batches for every setting within a round; rotate the order of settings.
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            config, batches = settings[name]
            window = batches[round_index * args.steps : (round_index + 1) * args.steps]
            started, cpu_started = time.perf_counter(), time.process_time()
            result = distill(teacher, copy.deepcopy(student_start), window, config)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            seconds[name].append(elapsed / result.steps)
            cpu_seconds[name].append(cpu / result.steps)
            print(
                f"round {round_index + 1} {name}: {elapsed / result.steps:.3f} s/step wall, "
                f"{cpu / result.steps:.3f} s/step CPU",
                flush=True,
            )

    # CPU seconds are the figure of merit on a shared machine: on one torch thread they
    # are the work a step does, whatever else runs; wall seconds are kept beside them.
    before = statistics.median(cpu_seconds["before"])
    rows = []
    for name in names:
        per_step = statistics.median(cpu_seconds[name])
        rows.append(
            {
                "setting": name,
                "cpu_seconds_per_step": round(per_step, 4),
                "steps_per_cpu_second": round(1 / per_step, 4),
                "speedup_vs_before": round(before / per_step, 3),
                "rounds_cpu": [round(s, 4) for s in cpu_seconds[name]],
                "rounds_wall": [round(s, 4) for s in seconds[name]],
            }
        )
    report = {
        "environment": environment(),
        "cpu_features": list(cpu_features()),
        "native_bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "student": "all-MiniLM-L6-v2, 50% FFN and 25% heads removed (magnitude)",
        "padding": {"before": _padding(shuffled), "sorted": _padding(ordered)},
        "results": rows,
    }
    env = report["environment"]
    lines = [
        "# Distillation speed: all-MiniLM-L6-v2, structured student",
        "",
        f"CPU: {env['cpu_model']} ({env['cpu_count']} cores, torch threads "
        f"{report['torch_threads']}); bf16 native: {report['native_bf16']} "
        f"(flags: {', '.join(report['cpu_features']) or 'none'}). torch "
        f"{report['torch']}, transformers {report['transformers']}.",
        f"Command: `{env['command']}`",
        "",
        f"{args.steps} steps of batch {args.batch_size} per setting and round, {args.rounds} "
        "interleaved rounds, median of the rounds, in CPU seconds of the process (one torch "
        "thread: the work of a step, whatever else the shared machine runs; wall seconds in "
        "the JSON). Padded tokens: "
        f"{report['padding']['before']['padded_fraction']:.1%} shuffled, "
        f"{report['padding']['sorted']['padded_fraction']:.1%} length-sorted.",
        "",
        "| setting | CPU s/step | steps per CPU s | vs before | rounds (CPU s/step) |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['cpu_seconds_per_step']:.3f} | "
            f"{row['steps_per_cpu_second']:.3f} | {row['speedup_vs_before']:.2f}x | "
            f"{', '.join(f'{s:.3f}' for s in row['rounds_cpu'])} |"
        )
    write_results(args.output_dir, args.name, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
