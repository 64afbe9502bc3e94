"""The digits families: scikit-learn's bundled 8x8 digits (no download), an MLP and a CNN.

Both train on a CPU in seconds. Layers are named: the names become the ONNX initializer
names and the manifest's layer names.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sklearn.datasets import load_digits
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

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsSplit:
    """Digits pixels in [0, 1] as float32 rows of 64, labels as int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int
    test_fraction: float = TEST_FRACTION

    @property
    def test_dataset(self) -> str:
        return f"sklearn digits test split (seed {self.seed}, {self.test_fraction:.0%})"


def load_digits_split(seed: int = 0, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """Stratified split of sklearn's digits, the same for the same seed."""
    digits = load_digits()
    # sklearn ships the pixels as integers 0..16; clients send [0, 1] floats.
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_test, y_test, seed, test_fraction)


@register_data_source("sklearn-digits")
def _digits(config: DataConfig, _architecture: Architecture) -> LabelledData:
    split = load_digits_split(config.seed, config.test_fraction)
    train, test = slice(config.train_samples), slice(config.test_samples)
    return LabelledData(
        split.x_train[train],
        split.y_train[train],
        split.x_test[test],
        split.y_test[test],
        split.test_dataset,
    )


def mlp() -> nn.Sequential:
    """MLP 64-128-64-10 with ReLU."""
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            fc2=nn.Linear(128, 64),
            relu2=nn.ReLU(),
            fc3=nn.Linear(64, 10),
        )
    )


def cnn() -> nn.Sequential:
    """Two 3x3 convolutions with BatchNorm, max-pool, Linear."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            bn1=nn.BatchNorm2d(16),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            bn2=nn.BatchNorm2d(32),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(32 * 4 * 4, 10),
        )
    )


MLP = register_architecture(
    Architecture(
        "digits-mlp",
        mlp,
        (ModelInput("pixels", (64,)),),
        "MLP 64-128-64-10 (ReLU) on 8x8 digits",
    )
)
CNN = register_architecture(
    Architecture(
        "digits-cnn",
        cnn,
        (ModelInput("image", (1, 8, 8)),),
        "Two 3x3 convolutions with BatchNorm and ReLU, max-pool, Linear on 8x8 digits",
    )
)
