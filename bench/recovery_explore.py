"""Which recovery training gets the most out of MiniLM's structured cut per step?

The `minilm.structured` start (50% of FFN neurons and 25% of heads cut at once, chosen and
refitted by least squares: `importance: reconstruction`; `--ffn-fraction` and
`--head-fraction` cut otherwise) on the recipe's data, then one
distillation per `--arm`, each from the same start, measured on held-out chunks and on
the never-trained `fortunes-literature`. An arm is a comma-separated list of settings:

- ``lr=3e-4``: the learning rate (warm-up 10%, then linear decay);
- ``steps=150``: optimizer steps (default `--steps`);
- ``batch=16``: rows per step; the recipe's batches of 32 are split (or kept at 32);
- ``hidden=1``, ``relation=1``: the layer-wise weights (0 and 0: output only);
- ``precision=fp32``: the forward passes' arithmetic (distill.precision; default auto).

    .venv/bin/python -m bench.recovery_explore --steps 150 \\
        --arm lr=3e-4 --arm lr=1e-3 --arm lr=3e-4,batch=16,steps=300

`--measure-train N` also measures on N training chunks: a student that fits what it
trained on far better than held-out text is short of text, not of capacity.
`--measure-every N` also measures each arm every N steps while it trains: a learning
curve (the learning rate still decays over the arm's whole length, so a point on a long
curve is not a short arm). The cut is cached under `--cache` (it takes minutes), keyed by
its allocation and calibration size.
Writes bench/results/recovery_explore.{json,md}. An exploration: one seed.
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
from sparseserve.sparsify.encoder import encoder_layers
from sparseserve.sparsify.layerwise import LayerwiseConfig
from sparseserve.sparsify.quality import Fidelity
from sparseserve.sparsify.recipe import head
from sparseserve.sparsify.reconstruct import (
    collect,
    refit,
    removal_order,
    select_groups,
    teacher_targets,
)
from sparseserve.sparsify.transformer import (
    EncoderPruneConfig,
    Importance,
    ReconstructConfig,
    _head_rows,
    prune_attention_heads,
    prune_encoder,
    prune_ffn_neurons,
)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "lr": float,
    "steps": int,
    "batch": int,
    "hidden": float,
    "relation": float,
    "precision": str,
}


def parse_arm(text: str, steps: int) -> dict[str, Any]:
    """``lr=1e-3,batch=16`` -> the arm's settings, defaults filled in."""
    arm: dict[str, Any] = {
        "lr": 3e-4,
        "steps": steps,
        "batch": 32,
        "hidden": 1.0,
        "relation": 1.0,
        "precision": "auto",
    }
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in SETTINGS:
            raise SystemExit(f"--arm {text!r}: unknown setting {key!r}; known: {sorted(SETTINGS)}")
        arm[key] = SETTINGS[key](value)
    if arm["precision"] not in ("auto", "fp32", "bf16"):
        raise SystemExit(f"--arm {text!r}: precision must be auto, fp32 or bf16")
    if arm["batch"] not in (8, 16, 32):
        raise SystemExit(f"--arm {text!r}: batch must be 8, 16 or 32")
    return arm


def arm_label(arm: dict[str, Any]) -> str:
    """``lr 0.0003, steps 150, ...``: an arm's settings as its row's name."""
    return ", ".join(
        f"{key} {value}" if isinstance(value, str) else f"{key} {value:g}"
        for key, value in arm.items()
    )


def split(batches: list[dict[str, torch.Tensor]], rows: int) -> list[dict[str, torch.Tensor]]:
    """Each batch cut into parts of `rows` rows (its padding kept)."""
    return [
        {name: tensor[start : start + rows] for name, tensor in batch.items()}
        for batch in batches
        for start in range(0, len(next(iter(batch.values()))), rows)
    ]


def global_cut(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    calibration: list[dict[str, torch.Tensor]],
    ridge: float,
) -> dict[str, list[int]]:
    """The same cut in total (18 heads and 4,608 neurons of MiniLM's 72 and 9,216), spread
    over the layers unevenly: each removal goes where it costs least. A layer's cost
    curve is its greedy least-squares removal costs on the dense model's own inputs,
    divided by the variance of the pre-LayerNorm sum there (the scale LayerNorm takes
    away); then the layers are cut and refitted one by one as `importance:
    reconstruction` does, each to its share. Returns the units removed per layer."""
    targets = teacher_targets(teacher, calibration)
    layers = encoder_layers(model)
    plan = {"attention": (32, 12, 18), "ffn": (1, 1536, 6 * 768)}  # group, units, remove
    removed: dict[str, list[int]] = {}
    for site, (group, units, total) in plan.items():
        curves = []
        for index in range(len(layers)):
            normal = collect(teacher, index, site, calibration, targets[index][site])
            _, costs = removal_order(normal, group, units - 1, ridge)
            sums = torch.cat(targets[index][site]).double()
            scale = float(((sums - sums.mean(dim=0)) ** 2).sum())
            curves.append([cost / scale for cost in costs])
        counts = [0] * len(layers)
        for _ in range(total):
            _, index = min(
                (curves[i][counts[i]], i) for i in range(len(layers)) if counts[i] < units - 1
            )
            counts[index] += 1
        removed[site] = counts
        progress(f"global cut: {site} units removed per layer {counts}")
    for index, layer in enumerate(layers):
        normal = collect(model, index, "attention", calibration, targets[index]["attention"])
        keep = select_groups(normal, 32, 12 - removed["attention"][index], ridge)
        prune_attention_heads(layer, keep)
        refit(layer.attention.output.dense, normal, ridge, _head_rows(32, keep.tolist()))
        normal = collect(model, index, "ffn", calibration, targets[index]["ffn"])
        keep = select_groups(normal, 1, 1536 - removed["ffn"][index], ridge)
        prune_ffn_neurons(layer, keep)
        refit(layer.output.dense, normal, ridge, keep)
    return removed


def curve_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A table per arm that was measured while it trained (`--measure-every`)."""
    lines: list[str] = []
    for label, row in rows.items():
        if not row.get("curve"):
            continue
        trained = "training" in row["curve"][0][1]
        table = [
            (
                str(step),
                f"{f['chunks']['cosine_mean']:.4f} / {f['literature']['cosine_mean']:.4f}",
                f"{f['chunks']['cosine_min']:.3f} / {f['literature']['cosine_min']:.3f}",
                f"{f['chunks']['top1_agreement']:.3f} / {f['literature']['top1_agreement']:.3f}",
                *([f"{f['training']['cosine_mean']:.4f}"] if trained else []),
            )
            for step, f in row["curve"]
        ]
        header = ("step", "cosine mean", "cosine min", "top-1",
                  *(["cosine mean, training chunks"] if trained else []))  # fmt: skip
        lines += [f"While it trained: {label}", "", *markdown_table(header, table), ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="default steps per arm")
    parser.add_argument("--arm", action="append", default=[], help="see the module docstring")
    parser.add_argument("--calibration", type=int, default=512, help="calibration chunks")
    parser.add_argument("--test-samples", type=int, default=500)
    parser.add_argument("--ffn-fraction", type=float, default=0.5, help="of FFN neurons cut")
    parser.add_argument("--head-fraction", type=float, default=0.25, help="of heads cut")
    parser.add_argument(
        "--allocation", choices=["uniform", "global"], default="uniform",
        help="uniform: every layer cut alike (the recipe); global: see global_cut",
    )  # fmt: skip
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sparseserve-obs-start"))
    parser.add_argument(
        "--measure-every",
        type=int,
        default=0,
        help="also measure each arm every N steps while it trains (a learning curve)",
    )
    parser.add_argument(
        "--measure-train",
        type=int,
        default=0,
        help="also measure on this many training chunks (does the student fit what it "
        "trained on much better than held-out text? then text, not capacity, limits it)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="cpu",
        help="where the arms train (distill.device); the cut is made on the CPU",
    )
    parser.add_argument(
        "--data-bundle", type=Path, help="read the data from this file (bench/device_bundle.py)"
    )
    parser.add_argument("--name", default="recovery_explore", help="results file stem")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arms = [parse_arm(text, args.steps) for text in args.arm or [""]]
    torch.manual_seed(0)
    started = time.perf_counter()
    teacher, data = recipe_data(args.test_samples, args.data_bundle)
    progress(f"data read in {time.perf_counter() - started:.0f} s")
    measure = Fidelities.of(teacher, data, args.measure_train).measure

    if args.allocation == "global" and (args.ffn_fraction, args.head_fraction) != (0.5, 0.25):
        raise SystemExit("--allocation global makes the recipe's cut: 0.5 of FFN, 0.25 of heads")
    prune = EncoderPruneConfig(
        ffn_fraction=args.ffn_fraction,
        head_fraction=args.head_fraction,
        importance=Importance.reconstruction,
        reconstruct=ReconstructConfig(ridge=1e-4),
    )
    fractions = f"{args.ffn_fraction:g}-{args.head_fraction:g}"
    if args.data_bundle:  # another teacher (fp16-rounded) and perhaps other data
        fractions += "-" + args.data_bundle.name
    cached = args.cache.with_name(
        f"{args.cache.name}-{args.allocation}-{args.calibration}-{fractions}.pt"
    )
    tic = time.perf_counter()
    if cached.exists():
        start = torch.load(cached, weights_only=False)
        progress(f"cut read from {cached}")
    else:
        start = copy.deepcopy(teacher)
        calibration = as_torch(head(data.x_train, args.calibration))
        if args.allocation == "global":
            global_cut(start, teacher, calibration, ridge=1e-4)
        else:
            prune_encoder(start, prune, calibration, teacher=teacher)
        torch.save(start, cached)
    rows: dict[str, dict[str, Any]] = {
        "cut": {"fidelity": measure(start), "seconds": time.perf_counter() - tic}
    }
    progress(f"cut: {rows['cut']['fidelity']}")

    def write(pending: int) -> None:
        """The report so far: after the cut and after each arm, so that a run stopped
        by a time limit keeps what it measured (`pending`: arms not yet run)."""
        report = {
            "environment": environment(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "data_bundle": str(args.data_bundle) if args.data_bundle else None,
            "prune": prune.model_dump(mode="json"),
            "allocation": args.allocation,
            "calibration_chunks": args.calibration,
            "arms_pending": pending,
            "rows": {
                name: {**row, "fidelity": {k: asdict(v) for k, v in row["fidelity"].items()}}
                for name, row in rows.items()
            },
        }
        trained = args.measure_train > 0
        training = [f"cosine mean, {args.measure_train} training chunks"] if trained else []
        header = ("arm", "cosine mean (chunks / literature)", "cosine min", "top-1",
                  *training, "s")  # fmt: skip
        table = [
            (
                name,
                *fidelity_cells(row["fidelity"]),
                *([f"{row['fidelity']['training'].cosine_mean:.4f}"] if trained else []),
                f"{row['seconds']:.0f}",
            )
            for name, row in rows.items()
        ]
        markdown = "\n".join(
            [
                "# Recovery training after MiniLM's structured cut",
                "",
                f"{args.ffn_fraction:.0%} of FFN neurons + {args.head_fraction:.0%} of heads cut "
                f"at once ({args.allocation} over the layers), "
                "chosen and refitted by least squares "
                f"({args.calibration} calibration chunks); each arm distils a copy of that cut "
                "(cosine + MSE on the embedding, plus the layer-wise terms at the weights "
                "given; embeddings frozen). Fidelity to the dense model on "
                f"{args.test_samples} held-out chunks / the never-trained fortunes-literature. "
                "One seed.",
                "",
                f"Arms trained on: {report['gpu'] or 'the CPU'} (--device {args.device})"
                + (
                    f"; data and fp16-rounded teacher from {args.data_bundle}."
                    if args.data_bundle
                    else "."
                ),
                "",
                *markdown_table(header, table),
                "",
                *(
                    [f"{pending} of {len(arms)} arm(s) had not run when this was written.", ""]
                    if pending
                    else []
                ),
                *curve_lines(rows),
                *machine_lines(report["environment"]),
                "",
            ]
        )
        write_results(args.output_dir, args.name, report, markdown)

    write(len(arms))
    train = as_torch(data.x_train)
    for done, arm in enumerate(arms, start=1):
        config = DistillConfig(
            steps=arm["steps"],
            learning_rate=arm["lr"],
            loss=DistillLoss.cosine_mse,
            log_every=50,
            freeze=("bert.embeddings",),
            device=args.device,
            precision=arm["precision"],
            layerwise=(
                LayerwiseConfig(hidden_weight=arm["hidden"], relation_weight=arm["relation"])
                if arm["hidden"] or arm["relation"]
                else None
            ),
        )
        model = copy.deepcopy(start)
        tic = time.perf_counter()
        batches = train if arm["batch"] == 32 else split(train, arm["batch"])
        curve: list[tuple[int, dict[str, Fidelity], float]] = []

        def after_step(step: int, model: torch.nn.Module = model, curve: list = curve) -> None:
            if args.measure_every and step % args.measure_every == 0:
                tic = time.perf_counter()
                curve.append((step, measure(model), time.perf_counter() - tic))
                progress(f"step {step}: {curve[-1][1]}")

        result = distill(teacher, model, batches, config, progress=progress, after_step=after_step)
        label = arm_label(arm)
        measuring = sum(spent for _, _, spent in curve)  # not training: off the arm's time
        rows[label] = {
            "arm": arm,
            "fidelity": measure(model),
            "seconds": time.perf_counter() - tic - measuring,
            "final_loss": result.mean_loss(first=False),
            "curve": [[step, {k: asdict(v) for k, v in f.items()}] for step, f, _ in curve],
        }
        progress(f"{label}: {rows[label]['fidelity']}")
        write(len(arms) - done)

    return 0


if __name__ == "__main__":
    sys.exit(main())
