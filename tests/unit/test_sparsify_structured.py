"""Structured pruning: chains found, dead neurons removed without changing outputs, and
the exported ONNX smaller."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("onnx", reason="needs the [sparsify] extra")

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from sparseserve.sparsify.digits import cnn, load_digits_split, mlp
from sparseserve.sparsify.export import export_onnx, run_onnx
from sparseserve.sparsify.recipe import RecipeError, TrainingData, apply
from sparseserve.sparsify.structured import (
    Link,
    ShrinkConfig,
    StructuredPruneConfig,
    find_links,
    remove_neurons,
    shrink,
)
from sparseserve.sparsify.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return load_digits_split(0).x_test[:100]


def trained_bn(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give BatchNorm real running statistics (a forward pass in training mode)."""
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def test_chains_are_found_through_batchnorm_relu_pool_and_flatten() -> None:
    assert find_links(mlp()) == [Link("fc1", None, "fc2"), Link("fc2", None, "fc3")]
    assert find_links(cnn()) == [
        Link("conv1", "bn1", "conv2"),
        Link("conv2", "bn2", "fc", spatial=16),  # 32 channels x 4x4 after the pool
    ]


def test_a_non_zero_preserving_module_breaks_the_chain() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2))  # sigmoid(0) != 0
    assert find_links(model) == []


def test_removing_dead_mlp_neurons_leaves_outputs_unchanged(pixels: np.ndarray) -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    dead = torch.tensor([0, 5, 17, 100])
    with torch.no_grad():
        model.fc1.weight[dead] = 0
        model.fc1.bias[dead] = 0
    x = torch.from_numpy(pixels)
    before = model(x).detach()
    assert shrink(model) == {"fc1": [128, 124], "fc2": [64, 64]}
    assert model.fc1.weight.shape == (124, 64) and model.fc2.weight.shape == (64, 124)
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-6)


def test_removing_dead_channels_of_a_conv_bn_chain_leaves_outputs_unchanged(
    pixels: np.ndarray,
) -> None:
    torch.manual_seed(0)
    x = torch.from_numpy(pixels.reshape(-1, 1, 8, 8))
    model = trained_bn(cnn(), x)
    with torch.no_grad():  # gamma = beta = 0: the channel outputs zero, whatever the conv
        model.bn1.weight[[1, 2]] = 0
        model.bn1.bias[[1, 2]] = 0
        model.bn2.weight[[0, 31]] = 0
        model.bn2.bias[[0, 31]] = 0
    before = model(x).detach()
    assert shrink(model) == {"conv1": [16, 14], "conv2": [32, 30]}
    assert model.conv2.weight.shape == (30, 14, 3, 3)
    assert model.bn2.running_mean.shape == (30,)
    assert model.fc.weight.shape == (10, 30 * 16)
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-5)


def test_removing_live_neurons_does_change_outputs(pixels: np.ndarray) -> None:
    """The check above can fail: taking out neurons that are not dead changes the output."""
    torch.manual_seed(0)
    model = mlp().eval()
    x = torch.from_numpy(pixels)
    before = model(x).detach()
    remove_neurons(model, find_links(model)[0], torch.tensor([0, 1]))
    assert not torch.allclose(model(x).detach(), before, atol=1e-3)


def test_structured_prune_then_shrink_gives_a_smaller_onnx_model(pixels: np.ndarray) -> None:
    split = load_digits_split(0)
    data = TrainingData(split.x_train[:300], split.y_train[:300], split.x_train[:10])
    torch.manual_seed(0)
    model = mlp()
    apply(model, StructuredPruneConfig(sparsity=0.5))
    apply(model, TrainConfig(epochs=1, lr=0.01), data=data)  # masked neurons stay dead
    trained = model(torch.from_numpy(pixels)).detach()
    report = apply(model, ShrinkConfig())
    assert report["widths"] == {"fc1": [128, 64], "fc2": [64, 32]}
    torch.testing.assert_close(model(torch.from_numpy(pixels)).detach(), trained, atol=1e-5, rtol=0)

    onnx_model = export_onnx(model.eval(), {"pixels": pixels[:2]}, "logits")
    shapes = {i.name: list(i.dims) for i in onnx.load_from_string(onnx_model).graph.initializer}
    assert shapes["fc1.weight"] == [64, 64]
    assert shapes["fc2.weight"] == [32, 64]
    assert shapes["fc3.weight"] == [10, 32]
    np.testing.assert_allclose(
        run_onnx(onnx_model, {"pixels": pixels}), trained.numpy(), atol=1e-5, rtol=1e-5
    )


def test_structured_prune_on_a_cnn_masks_channels_with_their_batchnorm() -> None:
    torch.manual_seed(0)
    model = cnn()
    report = apply(model, StructuredPruneConfig(sparsity=0.25))
    assert report["masked_neurons"] == {"conv1": 4, "conv2": 8}
    dead = (model.bn2.weight == 0) & (model.bn2.bias == 0)
    assert int(dead.sum()) == 8
    assert (model.conv2.weight.detach()[dead].abs().sum() == 0).item()
    shrink(model)
    assert model.conv2.out_channels == 24 and model.fc.in_features == 24 * 16


def test_shrinking_a_batchnorm_without_running_statistics_says_why() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3),
    )
    apply(model, StructuredPruneConfig(sparsity=0.5))
    with pytest.raises(RecipeError, match="track running statistics"):
        shrink(model)


def test_shrink_never_removes_a_whole_layer() -> None:
    model = mlp()
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.zero_()
    assert shrink(model)["fc2"] == [64, 64]


def test_exported_onnx_weights_match_after_shrinking(pixels: np.ndarray) -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    apply(model, StructuredPruneConfig(sparsity=0.5))
    shrink(model)
    graph = onnx.load_from_string(export_onnx(model, {"pixels": pixels[:2]}, "logits")).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_array_equal(weights["fc2.weight"], model.fc2.weight.detach().numpy())
