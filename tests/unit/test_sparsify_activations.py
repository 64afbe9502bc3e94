"""Activation sparsity measured on real data; dropout and DropConnect only while training."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseserve.sparsify.activations import (
    DropConnect,
    activation_sparsity,
    training_regularizers,
)
from sparseserve.sparsify.digits import load_digits_split, mlp
from sparseserve.sparsify.prune import MagnitudePruneConfig, mask_of
from sparseserve.sparsify.recipe import TrainingData, apply
from sparseserve.sparsify.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_activation_sparsity_counts_the_zeros_each_relu_outputs() -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    x = load_digits_split(0).x_test
    with torch.no_grad():
        hidden = torch.relu(model.fc1(torch.from_numpy(x)))
        second = torch.relu(model.fc2(hidden))
    measured = activation_sparsity(model, x, batch_size=50)  # batches add up right
    assert measured == {
        "relu1": pytest.approx(float((hidden == 0).float().mean())),
        "relu2": pytest.approx(float((second == 0).float().mean())),
    }
    assert 0.0 < measured["relu1"] < 1.0


def test_dropconnect_drops_weights_in_training_only() -> None:
    torch.manual_seed(0)
    drop = DropConnect(0.3)
    weight = torch.ones(200, 200)
    dropped = drop.train()(weight)
    assert float((dropped == 0).float().mean()) == pytest.approx(0.3, abs=0.02)
    assert float(dropped.mean()) == pytest.approx(1.0, abs=0.03)  # survivors scaled up
    assert torch.equal(drop.eval()(weight), weight)


def test_regularizers_act_while_training_and_leave_nothing_behind() -> None:
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.5))
    mask = mask_of(model.fc1).clone()
    keys = set(model.state_dict())
    x = torch.rand(32, 64)
    with training_regularizers(model, dropout=0.5, dropconnect=0.5):
        model.train()
        hidden = []
        handle = model.relu1.register_forward_hook(lambda m, i, o: hidden.append(o))
        model(x)
        # Dropout hooks run after this one: look at fc1's weight and relu2's input instead.
        handle.remove()
        assert float((model.fc1.weight == 0).float().mean()) > 0.6  # 50% pruned, then dropped
        model.eval()
        assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.5)
    assert set(model.state_dict()) == keys
    assert torch.equal(mask_of(model.fc1), mask)  # the pruning mask survived
    assert all(
        not isinstance(p, DropConnect)
        for m in model.modules()
        if parametrize.is_parametrized(m)
        for p in m.parametrizations.weight
    )


def test_dropout_changes_training_outputs_but_not_eval_outputs() -> None:
    torch.manual_seed(0)
    model = mlp()
    x = torch.rand(16, 64)
    reference = model.eval()(x).detach()
    with training_regularizers(model, dropout=0.5):
        model.train()
        assert not torch.allclose(model(x), reference)
        model.eval()
        assert torch.equal(model(x).detach(), reference)
    model.train()
    assert torch.equal(model(x).detach(), reference)  # hooks removed


def test_training_with_dropout_and_dropconnect_still_learns() -> None:
    split = load_digits_split(0)
    data = TrainingData(split.x_train, split.y_train, split.x_train[:10])
    torch.manual_seed(0)
    model = mlp()
    apply(model, TrainConfig(epochs=5, lr=0.003, dropout=0.1, dropconnect=0.1), data=data)
    logits = model(torch.from_numpy(split.x_test)).detach().numpy()
    assert float((logits.argmax(axis=1) == split.y_test).mean()) > 0.9
    assert isinstance(model.fc1, nn.Linear) and not parametrize.is_parametrized(model.fc1)
    assert np.isfinite(logits).all()
