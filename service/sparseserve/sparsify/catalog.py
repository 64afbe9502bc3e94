"""What a recipe's ``base.architecture`` and ``data.source`` may name.

Architectures and data sources are registered by the modules of `CATALOG_MODULES`
(an explicit list: a module that adds a family appends itself), so a recipe can only
name something that exists, and a bad name gets an error listing the known ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sparseserve.repository.manifest import Task
from sparseserve.sparsify.recipe import DataConfig, RecipeError

if TYPE_CHECKING:
    from torch import nn

CATALOG_MODULES = ("sparseserve.sparsify.digits",)


@dataclass(frozen=True)
class Architecture:
    """How to build an untrained model, and what its one input and output are called."""

    name: str
    build: Callable[[], nn.Module]
    input_name: str
    sample_shape: tuple[int, ...]  # one sample, without the batch dimension
    description: str
    output_name: str = "logits"
    task: Task = Task.classification


@dataclass(frozen=True)
class LabelledData:
    """A train/test split: rows of features (float32) and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_description: str


DataLoader = Callable[[DataConfig], LabelledData]
_ARCHITECTURES: dict[str, Architecture] = {}
_DATA_SOURCES: dict[str, DataLoader] = {}


def register_architecture(architecture: Architecture) -> Architecture:
    """Make `architecture` nameable in recipes."""
    _ARCHITECTURES[architecture.name] = architecture
    return architecture


def register_data_source(name: str) -> Callable[[DataLoader], DataLoader]:
    """Decorator: the loader of the data source `name`."""

    def decorate(loader: DataLoader) -> DataLoader:
        _DATA_SOURCES[name] = loader
        return loader

    return decorate


def _load_catalog() -> None:
    for module in CATALOG_MODULES:
        importlib.import_module(module)


def architecture(name: str) -> Architecture:
    """The registered architecture `name`; `RecipeError` naming the field if unknown."""
    _load_catalog()
    if name not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise RecipeError(f"base.architecture: unknown architecture {name!r} (known: {known})")
    return _ARCHITECTURES[name]


def load_data(config: DataConfig) -> LabelledData:
    """Load the data source a recipe names."""
    _load_catalog()
    if config.source not in _DATA_SOURCES:
        known = ", ".join(sorted(_DATA_SOURCES))
        raise RecipeError(f"data.source: unknown data source {config.source!r} (known: {known})")
    return _DATA_SOURCES[config.source](config)
