"""How long the greedy least-squares cut (`reconstruct.removal_order`) takes on one of
MiniLM's maps, against the plain form of the same algorithm.

The plain form updates the whole inverse with a new matrix at every removal
(``H⁻¹ - c cᵀ / b``, two n-by-n temporaries a step); `removal_order` updates it in place and
drops the rows of removed inputs as it goes. Both must return the same order. The problem
is MiniLM-sized: an FFN output map (1,536 neurons, 384 outputs, 768 removed one at a time)
and an attention output map (12 heads of 32 inputs, 3 removed), on random correlated
features, in float64 as the cut runs.

    .venv/bin/python -m bench.removal_order_speed --rounds 3

Writes bench/results/removal_order_speed.{json,md}; rounds alternate which form runs
first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.report import environment, machine_lines, markdown_table, progress, write_results
from sparseserve.sparsify.reconstruct import Normal, removal_order

RESULTS = Path(__file__).resolve().parent / "results"


def plain_removal_order(
    normal: Normal, group: int, remove: int, ridge: float
) -> tuple[list[int], list[float]]:
    """The same greedy choice with a full-size update of W and H⁻¹ at every step (the
    form `removal_order` had before, scores vectorized for single inputs as there)."""
    inputs = len(normal.xtx) - 1
    inverse = torch.linalg.inv(normal.regularized(ridge))
    weights = inverse @ normal.xty
    alive = torch.ones(inputs // group, dtype=torch.bool)
    order: list[int] = []
    costs: list[float] = []
    for _ in range(remove):
        if group == 1:
            scores = (weights[:inputs] ** 2).sum(dim=1) / torch.diagonal(inverse)[:inputs]
        else:
            scores = torch.full((len(alive),), float("inf"), dtype=torch.float64)
            for candidate in torch.nonzero(alive).flatten().tolist():
                span = slice(candidate * group, (candidate + 1) * group)
                solved = torch.linalg.solve(inverse[span, span], weights[span])
                scores[candidate] = (weights[span] * solved).sum()
        scores[~alive] = float("inf")
        best = int(torch.argmin(scores))
        rows = torch.arange(best * group, (best + 1) * group)
        block = inverse[rows][:, rows]
        columns = inverse[:, rows]
        weights = weights - columns @ torch.linalg.solve(block, weights[rows])
        inverse = inverse - columns @ torch.linalg.solve(block, columns.T)
        alive[best] = False
        order.append(best)
        costs.append(float(scores[best]))
    return order, costs


def problem(inputs: int, outputs: int, tokens: int, seed: int) -> Normal:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, inputs, generator=generator, dtype=torch.float64)
    x = x * torch.rand(inputs, generator=generator, dtype=torch.float64)  # uneven scales
    x[:, 1::2] += 0.3 * x[:, ::2]  # correlated inputs
    y = x[:, :outputs] @ torch.randn(outputs, outputs, generator=generator, dtype=torch.float64)
    y += torch.randn(y.shape, generator=generator, dtype=torch.float64)
    features = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], dim=1)
    return Normal(features.T @ features, features.T @ y, (y * y).sum(), y.sum(dim=0), tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20_000, help="calibration tokens")
    parser.add_argument("--name", default="removal_order_speed", help="results file stem")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cases = {
        "FFN output map: 1,536 neurons, 768 removed": (problem(1536, 384, args.tokens, 0), 1, 768),
        "attention output map: 12 heads of 32, 3 removed": (
            problem(384, 384, args.tokens, 1),
            32,
            3,
        ),
    }
    forms = {"plain": plain_removal_order, "removal_order": removal_order}
    rows = {}
    for case, (normal, group, remove) in cases.items():
        times: dict[str, list[float]] = {form: [] for form in forms}
        orders = {}
        for index in range(args.rounds):
            for form in list(forms)[:: 1 if index % 2 == 0 else -1]:
                started = time.perf_counter()
                orders[form], _ = forms[form](normal, group, remove, 1e-4)
                times[form].append(time.perf_counter() - started)
                progress(f"{case}, round {index + 1}: {form} {times[form][-1]:.2f} s")
        if orders["plain"] != orders["removal_order"]:
            raise SystemExit(f"{case}: the two forms removed different groups")
        rows[case] = {
            form: {"seconds": values, "median": statistics.median(values)}
            for form, values in times.items()
        }
    report = {
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "tokens": args.tokens,
        "rows": rows,
    }
    table = [
        (
            case,
            f"{row['plain']['median']:.2f}",
            f"{row['removal_order']['median']:.2f}",
            f"{row['plain']['median'] / row['removal_order']['median']:.1f}x",
        )
        for case, row in rows.items()
    ]
    markdown = "\n".join(
        [
            "# The greedy least-squares cut: in-place updates",
            "",
            "`reconstruct.removal_order` against the plain full-size update, the same "
            f"order removed; float64, {torch.get_num_threads()} torch threads, median of "
            f"{args.rounds} rounds (order alternated).",
            "",
            *markdown_table(("map", "plain s", "removal_order s", "speed-up"), table),
            "",
            *machine_lines(report["environment"]),
            "",
        ]
    )
    write_results(args.output_dir, args.name, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
