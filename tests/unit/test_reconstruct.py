"""Least-squares reconstruction after structured pruning (sparsify/reconstruct.py), on the
tiny BERT: it is exact where an exact answer exists, it brings a cut model closer to the
dense one, it follows a dropped-layer map, and the recipe step reports it."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")

import torch
from pydantic import ValidationError

from sparseserve.sparsify.minilm import SentenceEmbedder
from sparseserve.sparsify.recipe import RecipeError, TrainingData, apply
from sparseserve.sparsify.reconstruct import (
    Normal,
    reconstruct,
    refit,
    removal_order,
    select_groups,
)
from sparseserve.sparsify.transformer import (
    EncoderDropLayersConfig,
    EncoderPruneConfig,
    Importance,
    drop_layers,
    prune_encoder,
)
from tests.unit.test_layerwise_distill import feeds, tensors
from tests.unit.tiny_bert import tiny_bert


def embeddings(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([SentenceEmbedder(model).eval()(**batch) for batch in batches])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def test_an_unpruned_model_is_left_as_it_is() -> None:
    """With nothing cut, the dense weights are already the least-squares answer: the
    refit finds them again (up to the tiny ridge) and the outputs do not move."""
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    batches = tensors(feeds(6, seed=1))
    fits = reconstruct(student, teacher, batches, ridge=1e-9)
    assert len(fits) == 2 * 2  # two layers, attention and FFN each
    for fit in fits:
        assert fit.error_before < 1e-9 and fit.error_after < 1e-9
    held_out = tensors(feeds(2, seed=9))
    assert torch.allclose(embeddings(student, held_out), embeddings(teacher, held_out), atol=1e-4)


def test_reconstruction_brings_a_cut_model_back_towards_the_dense_one() -> None:
    teacher = tiny_bert()
    batches = tensors(feeds(12, seed=1))
    cut = copy.deepcopy(teacher)
    prune = EncoderPruneConfig(
        ffn_fraction=0.5, head_fraction=0.25, importance=Importance.activation
    )
    prune_encoder(cut, prune, batches)
    refitted = copy.deepcopy(cut)
    fits = reconstruct(refitted, teacher, batches)
    for fit in fits:  # least squares never does worse on the data it was fitted to
        assert fit.error_after <= fit.error_before + 1e-9
    assert any(fit.error_after < 0.5 * fit.error_before for fit in fits)
    held_out = tensors(feeds(4, seed=9))
    dense = embeddings(teacher, held_out)
    assert mean_cosine(embeddings(refitted, held_out), dense) > mean_cosine(
        embeddings(cut, held_out), dense
    )
    # Only the output maps changed: the kept heads' and neurons' input weights did not.
    for before, after in zip(cut.encoder.layer, refitted.encoder.layer, strict=True):
        assert torch.equal(before.intermediate.dense.weight, after.intermediate.dense.weight)
        assert torch.equal(before.attention.self.query.weight, after.attention.self.query.weight)
        assert not torch.equal(before.output.dense.weight, after.output.dense.weight)


def test_a_shallow_student_is_fitted_to_the_teacher_layers_it_stood_at() -> None:
    teacher = tiny_bert(layers=4)
    batches = tensors(feeds(12, seed=1))
    student = copy.deepcopy(teacher)
    drop_layers(student, [0, 3])
    before = copy.deepcopy(student)
    fits = reconstruct(student, teacher, batches)
    assert [fit.layer for fit in fits] == [0, 0, 1, 1]
    held_out = tensors(feeds(4, seed=9))
    dense = embeddings(teacher, held_out)
    assert mean_cosine(embeddings(student, held_out), dense) > mean_cosine(
        embeddings(before, held_out), dense
    )


def test_the_recipe_step_reconstructs_after_each_cut_and_reports_it() -> None:
    teacher = tiny_bert()
    train = feeds(8, seed=1)
    data = TrainingData(x_train=train, y_train=None, x_calibration=train, x_heldout=None)
    fields = {"ffn_fraction": 0.5, "head_fraction": 0.25, "importance": "activation"}
    plain = copy.deepcopy(teacher)
    apply(plain, EncoderPruneConfig.model_validate(fields), data=data)
    student = copy.deepcopy(teacher)
    config = EncoderPruneConfig.model_validate({**fields, "reconstruct": {"ridge": 0.001}})
    assert "least-squares" in config.label()
    report = apply(student, config, data=data, teacher=teacher)
    fits = report["rounds"][0]["reconstruct"]["fits"]
    assert len(fits) == 4
    assert all(f["error_after"] <= f["error_before"] + 1e-9 for f in fits)
    held_out = tensors(feeds(4, seed=9))
    dense = embeddings(teacher, held_out)
    assert mean_cosine(embeddings(student, held_out), dense) > mean_cosine(
        embeddings(plain, held_out), dense
    )


def test_reconstruction_needs_the_teacher_and_a_sane_ridge() -> None:
    train = feeds(2, seed=1)
    data = TrainingData(x_train=train, y_train=None, x_calibration=train, x_heldout=None)
    with pytest.raises(Exception, match="teacher"):
        apply(tiny_bert(), EncoderPruneConfig.model_validate({"reconstruct": {}}), data=data)
    with pytest.raises(ValidationError):
        EncoderPruneConfig.model_validate({"reconstruct": {"ridge": -1}})


def test_selection_keeps_the_groups_the_target_needs() -> None:
    """Y is made of input groups 0 and 2 only (the others are noise): keeping two of
    four groups, the greedy least-squares choice is exactly those, for heads (groups
    of 3 columns) and for single neurons."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=generator, dtype=torch.float64)
    w = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    w[3:6] = 0
    w[9:12] = 0
    y = x @ w + 0.3
    for group, keep, expected in ((3, 2, [0, 2]), (1, 6, [0, 1, 2, 6, 7, 8])):
        ones = torch.ones(len(x), 1, dtype=torch.float64)
        features = torch.cat([x, ones], dim=1)
        normal = Normal(
            xtx=features.T @ features,
            xty=features.T @ y,
            yty=(y * y).sum(),
            y_sum=y.sum(dim=0),
            tokens=len(x),
        )
        assert select_groups(normal, group, keep, ridge=1e-9).tolist() == expected
        # And the refit on the kept inputs is exact.
        dense = torch.nn.Linear(len(expected) * group, 5).double()
        kept = torch.cat([torch.arange(g * group, (g + 1) * group) for g in expected])
        before, after = refit(dense, normal, 1e-9, kept)
        assert after < 1e-9 < before


def test_reconstruction_importance_cuts_and_refits_closer_than_activation() -> None:
    teacher = tiny_bert()
    batches = tensors(feeds(12, seed=1))
    train = feeds(12, seed=1)
    data = TrainingData(x_train=train, y_train=None, x_calibration=train, x_heldout=None)
    fields = {"ffn_fraction": 0.5, "head_fraction": 0.5}
    by_activation = copy.deepcopy(teacher)
    config = EncoderPruneConfig.model_validate(
        {**fields, "importance": "activation", "reconstruct": {}}
    )
    apply(by_activation, config, data=data, teacher=teacher)
    by_reconstruction = copy.deepcopy(teacher)
    config = EncoderPruneConfig.model_validate({**fields, "importance": "reconstruction"})
    report = apply(by_reconstruction, config, data=data, teacher=teacher)
    assert [layer["heads"] for layer in report["layers"]] == [2, 2]
    assert [layer["ffn_neurons"] for layer in report["layers"]] == [48, 48]
    dense = embeddings(teacher, batches)
    assert mean_cosine(embeddings(by_reconstruction, batches), dense) > mean_cosine(
        embeddings(by_activation, batches), dense
    )


def test_the_drop_layers_step_can_refit_what_is_left() -> None:
    teacher = tiny_bert(layers=4)
    train = feeds(12, seed=1)
    data = TrainingData(x_train=train, y_train=None, x_calibration=train, x_heldout=None)
    plain = copy.deepcopy(teacher)
    apply(plain, EncoderDropLayersConfig(keep=(0, 3)), data=data)
    refitted = copy.deepcopy(teacher)
    config = EncoderDropLayersConfig.model_validate({"keep": [0, 3], "reconstruct": {}})
    report = apply(refitted, config, data=data, teacher=teacher)
    assert [fit["layer"] for fit in report["reconstruct"]["fits"]] == [0, 0, 1, 1]
    held_out = tensors(feeds(4, seed=9))
    dense = embeddings(teacher, held_out)
    assert mean_cosine(embeddings(refitted, held_out), dense) > mean_cosine(
        embeddings(plain, held_out), dense
    )
    with pytest.raises(Exception, match="teacher"):
        apply(copy.deepcopy(teacher), config, data=data)


def test_too_few_calibration_tokens_for_a_fit_is_refused() -> None:
    """A least-squares fit on fewer tokens than a few per input learns their noise
    (MiniLM's shallow variant fell to cosine 0.17 that way): it is refused, naming the
    setting to raise."""
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    few = tensors(feeds(1, seed=1, rows=2, tokens=12))  # at most 24 tokens, FFN: 97 inputs
    with pytest.raises(RecipeError, match="calibration_samples"):
        reconstruct(student, teacher, few)


def test_removal_costs_add_up_to_the_refitted_error() -> None:
    """Each removal's cost is what it adds to the squared error with the remaining groups
    refitted: after any number of removals, the costs so far sum to the error of the
    least-squares fit on the groups left (the full fit being exact here)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(8, 3, generator=generator, dtype=torch.float64) - 0.5
    features = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    normal = Normal(features.T @ features, features.T @ y, (y * y).sum(), y.sum(dim=0), len(x))
    for group in (1, 2):
        order, costs = removal_order(normal, group, 8 // group - 1, ridge=1e-12)
        assert sorted(order) == sorted(set(order)) and len(order) == 8 // group - 1
        assert all(cost >= -1e-9 for cost in costs)
        for done in range(1, len(order) + 1):
            kept = [g for g in range(8 // group) if g not in order[:done]]
            columns = torch.tensor([g * group + i for g in kept for i in range(group)] + [8])
            dense = torch.nn.Linear(len(columns) - 1, 3).double()
            _, after = refit(dense, normal, 1e-12, columns[:-1])
            assert after * normal.variance == pytest.approx(sum(costs[:done]), rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="cannot remove"):
        removal_order(normal, 1, 8, ridge=1e-9)


def test_each_removal_is_the_cheapest_refit_of_the_groups_left() -> None:
    """Greedy least squares by brute force: at every step the group removed is the one
    whose removal, with every other group left refitted from scratch, adds the least error,
    and its cost is that increase. Enough steps that the rows of removed groups are dropped
    from the running inverse several times."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(600, 24, generator=generator, dtype=torch.float64)
    x[:, 1::2] += 0.5 * x[:, ::2]  # correlated inputs: removals change the others' worth
    y = x @ torch.randn(24, 4, generator=generator, dtype=torch.float64)
    y += torch.randn(y.shape, generator=generator, dtype=torch.float64)
    features = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    normal = Normal(features.T @ features, features.T @ y, (y * y).sum(), y.sum(dim=0), len(x))

    def error(groups: list[int], group: int) -> float:
        columns = torch.tensor([g * group + i for g in groups for i in range(group)])
        dense = torch.nn.Linear(len(columns), 4).double()
        return refit(dense, normal, 1e-12, columns)[1] * normal.variance

    for group, remove in ((1, 20), (3, 6)):
        order, costs = removal_order(normal, group, remove, ridge=1e-12)
        left = list(range(24 // group))
        for removed, cost in zip(order, costs, strict=True):
            base = error(left, group)
            increase = {g: error([h for h in left if h != g], group) - base for g in left}
            assert removed == min(increase, key=increase.__getitem__)
            assert cost == pytest.approx(increase[removed], rel=1e-6, abs=1e-6)
            left.remove(removed)
