"""Pruning: exact sparsity, masks that hold through training, the cubic schedule, and the
N:M pattern."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparseserve.sparsify.digits import cnn, load_digits_split, mlp
from sparseserve.sparsify.prune import (
    GradualPruneConfig,
    MagnitudePruneConfig,
    NMPruneConfig,
    PruneScope,
    bake,
    cubic_sparsity,
    magnitude_masks,
    mask_of,
    nm_mask,
    prunable_layers,
)
from sparseserve.sparsify.recipe import TrainingData, apply
from sparseserve.sparsify.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> TrainingData:
    split = load_digits_split(0)
    # A slice keeps each training run well under a second.
    return TrainingData(split.x_train[:400], split.y_train[:400], split.x_train[:64])


def image_data(data: TrainingData) -> TrainingData:
    return TrainingData(
        data.x_train.reshape(-1, 1, 8, 8), data.y_train, data.x_calibration.reshape(-1, 1, 8, 8)
    )


def zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() == 0 for name, m in prunable_layers(model).items()}


def test_per_layer_magnitude_pruning_reaches_the_sparsity_exactly_in_each_layer() -> None:
    torch.manual_seed(0)
    model = mlp()
    report = apply(model, MagnitudePruneConfig(sparsity=0.7))
    for name, layer in prunable_layers(model).items():
        weight = layer.weight.detach()
        assert int((weight == 0).sum()) == round(0.7 * weight.numel()), name
        assert report["layer_sparsity"][name] == pytest.approx(0.7, abs=1 / weight.numel())


def test_magnitude_pruning_removes_the_smallest_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    before = layer.weight.detach().abs().clone()
    apply(layer, MagnitudePruneConfig(sparsity=0.5))
    kept = layer.weight.detach() != 0
    assert before[kept].min() >= before[~kept].max()


def test_global_pruning_is_exact_overall_and_uneven_across_layers() -> None:
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model.fc3.weight.mul_(20)  # a layer of large weights keeps more of them
    apply(model, MagnitudePruneConfig(sparsity=0.8, scope=PruneScope.global_))
    masks = zeros(model)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.8 * total)
    assert float(masks["fc3"].float().mean()) < 0.5 < float(masks["fc1"].float().mean())


def test_per_row_pruning_takes_the_same_fraction_from_every_output() -> None:
    layer = nn.Linear(40, 6)
    masks = magnitude_masks({"fc": layer}, 0.75, PruneScope.per_row)
    assert masks["fc"].sum(dim=1).tolist() == [10.0] * 6


def test_activation_aware_scores_keep_small_weights_on_large_inputs() -> None:
    """Wanda's score |w| * ||x_j||: a small weight on an input with a large norm
    outranks a larger weight on an input that is nearly always small."""
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 1.0]]))
    by_magnitude = magnitude_masks({"fc": layer}, 0.5, PruneScope.per_layer)
    norms = {"fc": torch.tensor([100.0, 1.0])}
    by_activation = magnitude_masks({"fc": layer}, 0.5, PruneScope.per_layer, norms)
    assert by_magnitude["fc"].tolist() == [[0.0, 1.0]]
    assert by_activation["fc"].tolist() == [[1.0, 0.0]]


def test_filter_fn_picks_the_layers_like_torchao() -> None:
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.5), lambda module, fqn: fqn != "fc3")
    assert mask_of(model.fc3) is None
    assert float((model.fc3.weight == 0).float().mean()) == 0.0
    assert float((model.fc1.weight == 0).float().mean()) == 0.5


def test_masks_persist_through_training(digits: TrainingData) -> None:
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.9))
    pruned = zeros(model)
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    # A large learning rate: Adam's momentum would move every weight if it could.
    apply(model, TrainConfig(epochs=2, lr=0.05), data=digits)
    for name, layer in prunable_layers(model).items():
        weight = layer.weight.detach()
        assert torch.equal(weight == 0, pruned[name]), f"{name}: a pruned weight came back"
        assert not torch.equal(weight[~pruned[name]], before[name][~pruned[name]])  # it trained


def test_pruning_again_keeps_every_earlier_zero() -> None:
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.5))
    first = zeros(model)
    with torch.no_grad():  # make pruned positions look large: they must still stay pruned
        for layer in prunable_layers(model).values():
            layer.parametrizations.weight.original.add_(10.0)
    apply(model, MagnitudePruneConfig(sparsity=0.6))
    for name, now in zeros(model).items():
        assert bool(now[first[name]].all()), name
        assert int(now.sum()) == round(0.6 * now.numel())


def test_bake_removes_the_parametrizations_and_keeps_the_zeros() -> None:
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.5))
    pruned = zeros(model)
    bake(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert {n: torch.equal(z, pruned[n]) for n, z in zeros(model).items()} == dict.fromkeys(
        pruned, True
    )
    assert set(model.state_dict()) == set(mlp().state_dict())


def test_the_cubic_schedule_of_zhu_and_gupta() -> None:
    assert cubic_sparsity(0, 100, 0.0, 0.9) == 0.0
    assert cubic_sparsity(100, 100, 0.0, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(50, 100, 0.1, 0.9) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert cubic_sparsity(150, 100, 0.0, 0.9) == pytest.approx(0.9)  # holds after the end
    values = [cubic_sparsity(t, 100, 0.0, 0.9) for t in range(101)]
    steps = np.diff(values)
    assert (steps >= 0).all() and steps[0] > steps[-1]  # fast early, slow late


def test_gradual_pruning_reaches_the_final_sparsity_exactly(digits: TrainingData) -> None:
    torch.manual_seed(0)
    model = mlp()
    config = GradualPruneConfig(final_sparsity=0.8, epochs=2, frequency_steps=5)
    report = apply(model, config, data=digits)
    for name, layer in prunable_layers(model).items():
        weight = layer.weight.detach()
        assert int((weight == 0).sum()) == round(0.8 * weight.numel()), name
    targets = [target for _, target in report["schedule"]]
    assert targets[0] == 0.0 and targets[-1] == pytest.approx(0.8)
    assert targets == sorted(targets)
    assert report["pruning_events"] == 2 * 13 // 5 + 2  # 13 batches an epoch, + start and end


def group_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    moved = weight.movedim(1, -1) if weight.dim() > 2 else weight
    return (moved.reshape(-1, m) != 0).sum(dim=1)


def test_nm_mask_keeps_the_n_largest_of_every_m() -> None:
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, -0.2, 4.0]])
    mask = nm_mask(weight, 2, 4)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]


def test_two_four_pruning_keeps_exactly_two_in_every_four_through_training(
    digits: TrainingData,
) -> None:
    torch.manual_seed(0)
    model = cnn()
    report = apply(model, NMPruneConfig(n=2, m=4))
    assert set(report["skipped"]) == {"conv1"}  # one input channel: no groups of four
    apply(model, TrainConfig(epochs=1, lr=0.01), data=image_data(digits))
    for name in ("conv2", "fc"):
        counts = group_nonzeros(getattr(model, name).weight.detach(), 4)
        assert counts.eq(2).all(), name
    # Convolutions group along input channels, at each kernel position.
    weight = model.conv2.weight.detach()
    assert ((weight[:, 0:4] != 0).sum(dim=1) == 2).all()


def test_nm_prune_on_an_mlp_is_half_sparse_in_every_layer() -> None:
    torch.manual_seed(0)
    model = mlp()
    report = apply(model, NMPruneConfig())
    assert report["skipped"] == {}
    assert report["layer_sparsity"] == {"fc1": 0.5, "fc2": 0.5, "fc3": 0.5}


def test_baking_a_deep_copy_leaves_the_original_pruned_and_working() -> None:
    """The pipeline bakes a copy for export and keeps the original for later variants:
    torch's own removal would break every copy that shares the parametrized class."""
    torch.manual_seed(0)
    model = mlp()
    apply(model, MagnitudePruneConfig(sparsity=0.5))
    exported = copy.deepcopy(model)
    bake(exported)
    assert type(exported.fc1) is nn.Linear
    x = torch.rand(3, 64)
    torch.testing.assert_close(exported(x), model(x))  # the original still computes
    assert mask_of(model.fc1) is not None
    apply(model, MagnitudePruneConfig(sparsity=0.7))  # and can be pruned further
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.7, abs=1 / 8192)
