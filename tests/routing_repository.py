"""A repository with one family of variants, for the routing, shadow and metrics tests:

fam.dense     the baseline (classifier MLP, 64 -> 10)
fam.pruned50  the same MLP with half of each weight matrix zeroed by magnitude
fam.broken    loads, then fails at run time on inputs >= 1 (a failing shadow)
fam.heavy     a much larger MLP with the same inputs and outputs (a slow shadow)
solo          a model without a manifest: its own family, variant "default"
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from sparseserve.repository.manifest import Quality, Task, VariantManifest
from sparseserve.testing import onnx_models

FAMILY = "fam"
SIZES = (64, 128, 10)
HEAVY_SIZES = (64, 1024, 1024, 1024, 10)


def parameters(sizes: tuple[int, ...]) -> int:
    return sum(a * b for a, b in itertools.pairwise(sizes))


def build(root: Path) -> Path:
    def manifest(variant: str, **fields: object) -> None:
        VariantManifest(
            family=FAMILY,
            variant=variant,
            baseline=None if variant == "dense" else f"{FAMILY}.dense",
            task=Task.classification,
            quality=[Quality(metric="accuracy", value=0.9, dataset="none", samples=0)],
            **fields,  # type: ignore[arg-type]
        ).write(root / f"{FAMILY}.{variant}" / "sparseserve.yaml")

    weights = parameters(SIZES)
    onnx_models.mlp(root / "fam.dense" / "1" / "model.onnx", SIZES)
    manifest("dense", parameters=weights, nonzero_parameters=weights, sparsity=0.0)
    onnx_models.mlp(root / "fam.pruned50" / "1" / "model.onnx", SIZES, sparsity=0.5)
    manifest(
        "pruned50",
        method="magnitude",
        parameters=weights,
        nonzero_parameters=weights // 2,
        sparsity=0.5,
    )
    onnx_models.failing(root / "fam.broken" / "1" / "model.onnx")
    manifest("broken", method="broken")
    onnx_models.mlp(root / "fam.heavy" / "1" / "model.onnx", HEAVY_SIZES)
    manifest("heavy", method="wide")
    onnx_models.add_constant(root / "solo" / "1" / "model.onnx", 1.0)
    return root


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    """Inputs with elements >= 1 in every row (so fam.broken fails on them)."""
    data = np.random.default_rng(seed).standard_normal((rows, SIZES[0])).astype(np.float32)
    data[:, 0] = 1.5
    return data
