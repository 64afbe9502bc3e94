"""What the MiniLM explorations share: the recipe's data, the dense model, and fidelity
to it on the held-out chunks and on the never-trained source."""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseserve.sparsify.catalog import LabelledData, architecture, load_data
from sparseserve.sparsify.export import run_torch
from sparseserve.sparsify.quality import Fidelity, fidelity
from sparseserve.sparsify.recipe import DataConfig


def save_data_bundle(data: LabelledData, path: Path) -> None:
    """`data` in one gzipped file, for a machine that cannot build it
    (bench/device_bundle.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as file:
        pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)


def recipe_data(
    test_samples: int, bundle: Path | None = None
) -> tuple[torch.nn.Module, LabelledData]:
    """The dense all-MiniLM-L6-v2 (in eval mode) and recipes/minilm.yaml's data:
    `english-mix` in batches of 32, `fortunes-literature` held out, `test_samples` of the
    held-out chunks; read from `bundle` instead where one is given (a file this project
    wrote: it is unpickled)."""
    arch = architecture("all-minilm-l6-v2")
    teacher = arch.build()
    teacher.eval()
    if bundle is not None:
        with gzip.open(bundle, "rb") as file:
            data = pickle.load(file)
        rows = sum(len(feed["input_ids"]) for feed in getattr(data, "x_test", []))
        if not isinstance(data, LabelledData) or rows != test_samples:
            raise SystemExit(f"{bundle}: not a data bundle of {test_samples} test samples")
        return teacher, data
    data = load_data(
        DataConfig(
            source="english-mix",
            heldout_source="fortunes-literature",
            test_fraction=0.1,
            test_samples=test_samples,
            batch_size=32,
            sort_window_batches=16,
        ),
        arch,
    )
    return teacher, data


def as_torch(feeds: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Tokenizer batches of numpy arrays -> of torch tensors."""
    return [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds]


@dataclass
class Fidelities:
    """The dense model's outputs on both held-out sets (and, with `training` > 0, on that
    many of the training chunks: how much better a student fits what it was trained on
    says whether more or broader text would help), to measure students against."""

    tests: dict[str, Any]
    dense: dict[str, Any]

    @classmethod
    def of(cls, teacher: torch.nn.Module, data: LabelledData, training: int = 0) -> Fidelities:
        tests = {"chunks": data.x_test, "literature": data.x_test_source}
        if training:
            from sparseserve.sparsify.recipe import head

            tests["training"] = head(data.x_train, training)
        return cls(tests, {name: run_torch(teacher, rows) for name, rows in tests.items()})

    def measure(self, model: torch.nn.Module) -> dict[str, Fidelity]:
        """`model`'s fidelity to the dense model on the chunks and on the literature (and
        on the training chunks measured, if any)."""
        return {
            name: fidelity(self.dense[name], run_torch(model, rows))
            for name, rows in self.tests.items()
        }


def fidelity_cells(fidelities: dict[str, Fidelity]) -> tuple[str, str, str]:
    """Cosine mean, cosine min and top-1 as "chunks / literature" table cells."""
    c, lit = fidelities["chunks"], fidelities["literature"]
    return (
        f"{c.cosine_mean:.4f} / {lit.cosine_mean:.4f}",
        f"{c.cosine_min:.3f} / {lit.cosine_min:.3f}",
        f"{c.top1_agreement:.3f} / {lit.top1_agreement:.3f}",
    )
