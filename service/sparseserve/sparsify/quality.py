"""What a variant keeps, as the manifest's `quality` rows: one function per task.

- classification: accuracy on the labelled test split (with the baseline's), and top-1
  agreement with the baseline's predictions;
- embedding: how close the variant's embeddings are to the baseline's on the same held-out
  inputs: mean and worst cosine, and top-1 retrieval agreement (with each input as a query
  over the others, do both find the same nearest neighbour?).

Numpy only: the numbers are computed on onnxruntime's outputs, as they will be served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseserve.repository.manifest import Quality, Task
from sparseserve.sparsify.recipe import RecipeError


@dataclass(frozen=True)
class Fidelity:
    """How close a variant's embeddings are to the baseline's on the same inputs."""

    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    samples: int

    def rounded(self) -> dict[str, float]:
        """The three numbers, for a step report."""
        return {
            "cosine_mean": round(self.cosine_mean, 6),
            "cosine_min": round(self.cosine_min, 6),
            "top1_agreement": round(self.top1_agreement, 6),
        }


def _unit(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    return unit


def _nearest(x: np.ndarray) -> np.ndarray:
    similarity = _unit(x) @ _unit(x).T
    np.fill_diagonal(similarity, -np.inf)
    nearest: np.ndarray = similarity.argmax(axis=1)
    return nearest


def fidelity(baseline: np.ndarray, variant: np.ndarray) -> Fidelity:
    """Cosine of each variant embedding to the baseline's, and top-1 retrieval agreement."""
    if baseline.shape != variant.shape or baseline.ndim != 2 or baseline.shape[0] < 2:
        raise ValueError(
            f"need two equal [n >= 2, dim] embedding arrays, got {baseline.shape} "
            f"and {variant.shape}"
        )
    cosines = (_unit(baseline) * _unit(variant)).sum(axis=1)
    return Fidelity(
        cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()),
        top1_agreement=float((_nearest(baseline) == _nearest(variant)).mean()),
        samples=int(baseline.shape[0]),
    )


def classification_quality(
    outputs: np.ndarray,
    labels: np.ndarray | None,
    dataset: str,
    baseline: tuple[np.ndarray, float] | None = None,
) -> list[Quality]:
    """Accuracy, and for a variant (`baseline` = the baseline's logits and accuracy) the
    baseline's accuracy beside it and top-1 agreement with the baseline."""
    if labels is None:
        raise RecipeError("a classifier is measured on labelled data; the data source has none")
    samples = len(labels)
    rows = [
        Quality(
            metric="accuracy",
            value=accuracy(outputs, labels),
            dataset=dataset,
            samples=samples,
            baseline_value=None if baseline is None else baseline[1],
        )
    ]
    if baseline is not None:
        agreement = outputs.argmax(axis=1) == baseline[0].argmax(axis=1)
        rows.append(
            Quality(
                metric="top1_agreement",
                value=float(agreement.mean()),
                dataset=dataset,
                samples=samples,
            )
        )
    return rows


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is the label."""
    return float((outputs.argmax(axis=1) == labels).mean())


def embedding_quality(outputs: np.ndarray, reference: np.ndarray, dataset: str) -> list[Quality]:
    """`fidelity` of `outputs` to `reference` (the baseline's embeddings; for the baseline
    itself, its torch outputs: then the rows say how exact the export is)."""
    measured = fidelity(reference, outputs)
    return [
        Quality(
            metric=metric,
            value=value,
            dataset=dataset,
            samples=measured.samples,
            baseline_value=1.0,
        )
        for metric, value in (
            ("cosine_mean", measured.cosine_mean),
            ("cosine_min", measured.cosine_min),
            ("top1_agreement", measured.top1_agreement),
        )
    ]


def summary(task: Task, outputs: np.ndarray, labels: np.ndarray | None) -> str:
    """One progress-line phrase about a freshly built variant."""
    if task is Task.classification and labels is not None:
        return f"test accuracy {accuracy(outputs, labels):.4f}"
    return f"{len(outputs)} test outputs of width {outputs.shape[-1]}"
