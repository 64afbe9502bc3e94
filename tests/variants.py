"""A model family for the monitoring and comparison tests: a dense MLP baseline and a
magnitude-pruned copy of it, each with its manifest (built with onnx, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sparseserve.repository.manifest import Quality, Task, VariantManifest
from sparseserve.testing import onnx_models

FAMILY = "tiny-mlp"
DENSE = f"{FAMILY}.dense"
PRUNED = f"{FAMILY}.pruned80"
SIZES = (64, 128, 10)


def _weights(model: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("w")]


def build_family(root: Path, sparsity: float = 0.8) -> Path:
    """`tiny-mlp.dense` and `tiny-mlp.pruned80` (the smallest 80% of each weight matrix
    set to zero) in `root`."""
    dense_path = onnx_models.mlp(root / DENSE / "1" / "model.onnx", sizes=SIZES)
    model = onnx.load(str(dense_path))
    for tensor in model.graph.initializer:
        if tensor.name.startswith("w"):
            w = numpy_helper.to_array(tensor).copy()
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    pruned_path = root / PRUNED / "1" / "model.onnx"
    pruned_path.parent.mkdir(parents=True)
    onnx.save(model, str(pruned_path))

    for name, path, variant, baseline in (
        (DENSE, dense_path, "dense", None),
        (PRUNED, pruned_path, "pruned80", DENSE),
    ):
        weights = _weights(onnx.load(str(path)))
        parameters = sum(w.size for w in weights)
        nonzero = sum(int(np.count_nonzero(w)) for w in weights)
        VariantManifest(
            family=FAMILY,
            variant=variant,
            baseline=baseline,
            task=Task.classification,
            method="dense" if baseline is None else "magnitude",
            parameters=parameters,
            nonzero_parameters=nonzero,
            sparsity=1 - nonzero / parameters,
            file_bytes=path.stat().st_size,
            quality=[Quality(metric="accuracy", value=0.9, dataset="synthetic", samples=0)],
        ).write(root / name / "sparseserve.yaml")
    return root
