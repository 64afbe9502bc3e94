"""Your own model in a recipe: this file registers an architecture and a data source,
and `wine.yaml` lists it under `catalog:` and names both. Run from the repository root:

    sparseserve sparsify --recipe recipes/own-model/wine.yaml --repository ./models

The architecture: `build` returns an untrained torch module whose forward takes the
declared inputs positionally (each with a batch dimension first) and returns one tensor
(the logits of a classifier). Name the layers: the names become the ONNX initializers'
and the manifest's layer names. The data source: a function of the recipe's `data`
block and the architecture, returning train and test rows (and labels for a classifier).
Here: scikit-learn's bundled wine measurements (178 rows, 13 features, 3 cultivars).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn

from sparseserve.sparsify.catalog import (
    Architecture,
    LabelledData,
    ModelInput,
    register_architecture,
    register_data_source,
)
from sparseserve.sparsify.recipe import DataConfig


def wine_mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(13, 64),
            relu1=nn.ReLU(),
            fc2=nn.Linear(64, 32),
            relu2=nn.ReLU(),
            fc3=nn.Linear(32, 3),
        )
    )


register_architecture(
    Architecture(
        name="wine-mlp",
        build=wine_mlp,
        inputs=(ModelInput("features", (13,)),),
        description="MLP 13-64-32-3 on standardised wine measurements",
    )
)


@register_data_source("sklearn-wine")
def wine(config: DataConfig, architecture: Architecture) -> LabelledData:
    """A stratified split, standardised with the training rows' mean and spread (a
    client sends the standardised features the model was trained on)."""
    data = load_wine()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=config.test_fraction, random_state=config.seed,
        stratify=data.target,
    )  # fmt: skip
    mean, spread = x_train.mean(axis=0), x_train.std(axis=0)
    scale = lambda x: ((x - mean) / spread).astype(np.float32)  # noqa: E731
    return LabelledData(
        scale(x_train), y_train.astype(np.int64), scale(x_test), y_test.astype(np.int64),
        f"sklearn wine test split (seed {config.seed}, {config.test_fraction:.0%})",
    )  # fmt: skip
