"""L1 and group lasso: the penalties are what they claim, and training with them drives
weights (and whole neurons) towards zero."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import torch
from torch import nn

from sparseserve.sparsify.digits import load_digits_split, mlp
from sparseserve.sparsify.recipe import TrainingData, apply
from sparseserve.sparsify.regularize import (
    group_lasso_penalty,
    l1_penalty,
    near_zero_fraction,
    near_zero_rows,
)
from sparseserve.sparsify.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> TrainingData:
    split = load_digits_split(0)
    return TrainingData(split.x_train[:600], split.y_train[:600], split.x_train[:10])


def test_penalties_on_known_weights() -> None:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -4.0], [0.0, 1.0]]))
    model = nn.Sequential(layer)
    assert float(l1_penalty(model).detach()) == pytest.approx(8.0)
    # Row norms 5 and 1, each scaled by sqrt(2 weights per row).
    assert float(group_lasso_penalty(model).detach()) == pytest.approx(6.0 * 2**0.5)
    assert near_zero_fraction(model, 0.5) == {"0": 0.25}
    assert near_zero_rows(model, 3.0) == {"0": 0.5}  # rms of row 1 is 0.71, of row 0 3.5


def trained(data: TrainingData, **penalty: float) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = mlp()
    report = apply(model, TrainConfig(epochs=6, lr=0.003, **penalty), data=data)
    return model, report


def test_l1_drives_weights_near_zero(digits: TrainingData) -> None:
    plain, _ = trained(digits)
    sparse, report = trained(digits, l1=3e-4)
    threshold = 1e-3
    plain_fraction = sum(near_zero_fraction(plain, threshold).values())
    sparse_fraction = sum(near_zero_fraction(sparse, threshold).values())
    assert sparse_fraction > 3 * plain_fraction
    near_zero = report["near_zero_weights"]
    assert near_zero["after"] > near_zero["before"] + 0.1


def test_group_lasso_drives_whole_neurons_near_zero(digits: TrainingData) -> None:
    plain, _ = trained(digits)
    grouped, report = trained(digits, group_lasso=2e-3, near_zero_threshold=5e-3)
    assert sum(near_zero_rows(plain, 5e-3).values()) == 0.0
    rows = report["near_zero_neurons"]
    assert rows["after"]["fc1"] > 0.1 and rows["before"]["fc1"] == 0.0
    assert sum(near_zero_rows(grouped, 5e-3).values()) > 0.1
