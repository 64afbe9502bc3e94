"""What a recipe's ``base.architecture`` and ``data.source`` may name.

Architectures and data sources are registered by the modules of `CATALOG_MODULES`
(an explicit list: a module that adds a family appends itself), so a recipe can only
name something that exists, and a bad name gets an error listing the known ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparseserve.repository.manifest import Task
from sparseserve.sparsify.recipe import DataConfig, Feed, RecipeError, Rows

if TYPE_CHECKING:
    from torch import nn

CATALOG_MODULES = (
    "sparseserve.sparsify.digits",
    "sparseserve.sparsify.minilm",
    "sparseserve.sparsify.corpus",
)
# The name of every dimension that `None` marks in a `ModelInput`: inputs that share it
# (token ids and their mask) must agree on it.
SEQUENCE_AXIS = "sequence"
TextEncoder = Callable[[Sequence[str]], Feed]


@dataclass(frozen=True)
class ModelInput:
    """One input of the exported graph. `sample_shape` is one sample's shape, without the
    batch dimension; `None` marks a dimension that varies between batches (a sequence)."""

    name: str
    sample_shape: tuple[int | None, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class Architecture:
    """How to build the starting model (untrained, or pretrained weights from a package),
    and what its inputs and output are called."""

    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[ModelInput, ...]
    description: str
    output_name: str = "logits"
    task: Task = Task.classification
    # For text data sources: loads the model's tokenizer, returns texts -> one padded batch.
    text_encoder: Callable[[], TextEncoder] | None = None
    # torch threads for building (0: torch's default). The digits models are so small that
    # a second thread on a shared 2-core machine only spins against the first.
    torch_threads: int = 1

    @property
    def input_name(self) -> str:
        """The first input (the only one of a single-input model)."""
        return self.inputs[0].name

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input, its varying axes: 0 is the batch, `None` dimensions the sequence."""
        return {
            spec.name: {
                0: "batch",
                **{i + 1: SEQUENCE_AXIS for i, d in enumerate(spec.sample_shape) if d is None},
            }
            for spec in self.inputs
        }


@dataclass(frozen=True)
class LabelledData:
    """A train/test split: model inputs (`Rows`) and, for classifiers, integer labels."""

    x_train: Rows
    y_train: np.ndarray | None
    x_test: Rows
    y_test: np.ndarray | None
    test_description: str
    # A second test set of a kind never trained on (text of a held-out source), if any.
    x_test_source: Rows | None = None
    test_source_description: str = ""


# A loader gets the architecture too: text becomes input only through its tokenizer.
DataLoader = Callable[[DataConfig, Architecture], LabelledData]
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


def import_catalog(entries: Sequence[str], directory: Path) -> None:
    """Import a recipe's `catalog:`: each a Python file (a path ending in .py, relative to
    `directory`, the recipe's folder) or an importable module, which registers the
    architectures and data sources the recipe names. `RecipeError` names a file that is
    not there, and the error an import raised."""
    for entry in entries:
        try:
            if entry.endswith(".py"):
                path = (directory / entry).resolve()
                if not path.is_file():
                    raise RecipeError(f"catalog: {entry!r}: no such file ({path})")
                name = f"sparseserve_catalog_{path.stem}_{abs(hash(str(path)))}"
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                # Its own helpers beside it import first, as for a script (a layers.py
                # there, not an installed module of that name).
                sys.path.insert(0, str(path.parent))
                before = set(sys.modules)
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
                finally:
                    sys.path.remove(str(path.parent))
                    # Its helpers stay with it, not in sys.modules: another recipe's
                    # layers.py is its own.
                    for helper in set(sys.modules) - before:
                        origin = getattr(sys.modules[helper], "__file__", None) or ""
                        if Path(origin).parent == path.parent:
                            del sys.modules[helper]
            else:
                importlib.import_module(entry)
        except RecipeError:
            raise
        except Exception as exc:  # the user's code: say where, and what it raised
            raise RecipeError(
                f"catalog: importing {entry!r} failed: {type(exc).__name__}: {exc}"
            ) from exc


def architecture(name: str) -> Architecture:
    """The registered architecture `name`; `RecipeError` naming the field if unknown."""
    _load_catalog()
    if name not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise RecipeError(
            f"base.architecture: unknown architecture {name!r} (known: {known}); your own "
            "model is registered by a file the recipe lists under `catalog:` "
            "(docs/sparsify.md, Your own model)"
        )
    return _ARCHITECTURES[name]


def load_data(config: DataConfig, architecture: Architecture) -> LabelledData:
    """Load the data source a recipe names, as input for `architecture`."""
    _load_catalog()
    if config.source not in _DATA_SOURCES:
        known = ", ".join(sorted(_DATA_SOURCES))
        raise RecipeError(
            f"data.source: unknown data source {config.source!r} (known: {known}); your own "
            "is registered by a file the recipe lists under `catalog:`"
        )
    return _DATA_SOURCES[config.source](config, architecture)
