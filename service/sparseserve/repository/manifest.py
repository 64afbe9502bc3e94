"""`sparseserve.yaml`: what a model directory is, how it was made and what it costs.

Every variant of a family (dense, pruned-90, pruned-90-int8, ...) is its own model
directory; its manifest names the family, the variant and the dense baseline, and
records what was measured when it was built. The file is optional: a plain Triton
repository without manifests serves fine (each model is then its own family).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field

from sparseserve.yaml_files import read_model

MANIFEST_FILENAME = "sparseserve.yaml"
MANIFEST_SCHEMA_VERSION = 1

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ManifestError(ValueError):
    """A manifest that does not parse or does not validate."""


class Task(StrEnum):
    classification = "classification"
    embedding = "embedding"
    regression = "regression"
    other = "other"


class Precision(StrEnum):
    """The arithmetic a variant is meant to run in. fp32: every engine's exact float
    arithmetic; bf16: bfloat16 where the engine computes it (OpenVINO on a CPU with
    AVX512-BF16 or AMX), which changes the numbers (~1e-2 relative), so it is a variant of
    its own with its own measured quality, never an engine's silent default."""

    fp32 = "fp32"
    bf16 = "bf16"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerSparsity(_Strict):
    """Sparsity of one weight tensor."""

    name: str
    shape: list[int]
    parameters: NonNegativeInt
    nonzero: NonNegativeInt
    sparsity: Fraction


class ActivationSparsity(_Strict):
    """Fraction of an activation layer's outputs that were exactly zero on real data."""

    name: str
    zero_fraction: Fraction


class Quality(_Strict):
    """What the variant scores, measured when it was built.

    `metric` names the number (``accuracy`` on a labelled test split, ``cosine`` to
    the baseline's outputs, ...); `dataset` says on what it was measured.
    """

    metric: str
    value: float
    dataset: str
    samples: NonNegativeInt
    baseline_value: float | None = None


class VariantManifest(_Strict):
    """The contents of ``<repository>/<model>/sparseserve.yaml``."""

    schema_version: int = Field(MANIFEST_SCHEMA_VERSION, ge=1, le=MANIFEST_SCHEMA_VERSION)
    family: str = Field(min_length=1)
    variant: str = Field(min_length=1)
    baseline: str | None = Field(
        None, description="Model name of the family's dense baseline; None if this is it."
    )
    task: Task = Task.other
    description: str = ""
    method: str = Field("dense", description="How the variant was made: dense, magnitude, ...")
    created: datetime | None = None
    parameters: NonNegativeInt | None = None
    nonzero_parameters: NonNegativeInt | None = None
    sparsity: Fraction | None = Field(None, description="Global weight sparsity.")
    layers: list[LayerSparsity] = Field(default_factory=list)
    quantization: str | None = Field(None, description="e.g. int8 dynamic per-channel")
    precision: Precision = Field(
        Precision.fp32,
        description="What the server must compute the variant in: fp32, or bf16 (served "
        "only by an engine and CPU that compute bf16; the load fails elsewhere).",
    )
    file_bytes: NonNegativeInt | None = None
    gzip_bytes: NonNegativeInt | None = Field(
        None,
        description="model.onnx after gzip at level 6 (level 9 before 2026-12-04: within 0.1%)",
    )
    activation_sparsity: list[ActivationSparsity] = Field(default_factory=list)
    notes: list[str] = Field(
        default_factory=list, description="What the numbers do not say (zeros stored densely...)"
    )
    quality: list[Quality] = Field(default_factory=list)
    recipe: dict[str, object] | None = None

    @property
    def is_baseline(self) -> bool:
        return self.baseline is None

    @classmethod
    def read(cls, path: Path) -> VariantManifest:
        """Parse and validate a manifest file; raise `ManifestError` saying what is wrong."""
        return read_model(cls, path, "manifest", ManifestError)

    def write(self, path: Path) -> None:
        """Write the manifest as YAML (atomically: a poller never sees half a file)."""
        text = yaml.safe_dump(
            self.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
