"""The recipe pipeline: what a variant inherits from the variant it starts from, and
numbers that do not depend on which other variants a recipe builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import torch

from sparseserve.sparsify.pipeline import FamilyBuilder, _distill_configs, build_family
from sparseserve.sparsify.recipe import RecipeError, load_recipe, parse_recipe


def recipe(*variants: dict) -> dict:
    return {
        "family": "t",
        "base": {"architecture": "digits-mlp", "steps": [{"train": {"epochs": 2}}]},
        "data": {"source": "sklearn-digits", "calibration_samples": 32},
        "variants": [{"name": "dense"}, *variants],
    }


PRUNED = {
    "name": "pruned",
    "steps": [{"magnitude_prune": {"sparsity": 0.5}}, {"train": {"epochs": 1}}],
}
INT8 = {"name": "int8", "steps": [{"quantize": {}}]}


def build(data: dict) -> FamilyBuilder:
    return FamilyBuilder(parse_recipe(data), progress=lambda line: None).build()


def test_a_variant_from_a_quantized_one_inherits_its_torch_steps_not_its_quantization() -> None:
    child = {
        "name": "int8-then-pruned",
        "from": "int8",
        "steps": [{"magnitude_prune": {"sparsity": 0.5}}],
    }
    builder = build(recipe(INT8, child))
    manifest = builder.manifest(builder.variants["int8-then-pruned"])
    assert manifest.quantization is None
    assert manifest.method == "magnitude 50% per_layer"
    assert [next(iter(step)) for step in manifest.recipe["steps"]] == ["magnitude_prune"]
    assert builder.manifest(builder.variants["int8"]).quantization == "int8 dynamic per-channel"


def test_a_variant_from_another_carries_the_whole_lineage() -> None:
    child = {"name": "pruned-int8", "from": "pruned", "steps": [{"quantize": {}}]}
    builder = build(recipe(PRUNED, child))
    manifest = builder.manifest(builder.variants["pruned-int8"])
    assert manifest.method == "magnitude 50% per_layer + train 1 epochs + int8 dynamic per-channel"
    assert manifest.sparsity == pytest.approx(0.5)
    assert manifest.recipe["from"] == "pruned"


def test_a_variant_comes_out_the_same_whatever_is_built_before_it() -> None:
    alone = build(recipe(PRUNED)).variants["pruned"]
    after_another = build(recipe(INT8, PRUNED)).variants["pruned"]
    np.testing.assert_array_equal(alone.outputs, after_another.outputs)


def test_the_baseline_gets_an_evaluation_sample_for_compare(tmp_path) -> None:
    """`sparseserve compare` finds real rows beside the baseline: the test split the
    manifests' accuracy was measured on, with its labels."""
    from sparseserve.repository.eval_data import EVAL_DATA_FILENAME, read_eval_data

    builder = build(recipe(PRUNED))
    builder.write(tmp_path)
    data = read_eval_data(tmp_path / "t.dense" / EVAL_DATA_FILENAME)
    assert not (tmp_path / "t.pruned" / EVAL_DATA_FILENAME).exists()
    assert list(data.inputs) == [builder.architecture.input_name]
    rows = len(builder.labelled.x_test)
    np.testing.assert_array_equal(data.inputs[builder.architecture.input_name],
                                  builder.labelled.x_test.reshape(rows, -1))  # fmt: skip
    np.testing.assert_array_equal(data.labels, builder.labelled.y_test)
    assert data.description == builder.labelled.test_description


def test_every_distill_config_is_found_the_nested_ones_too() -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "minilm.yaml")
    configs = list(_distill_configs(recipe))
    # structured's and shallow's distill steps, and the one inside sparse's gradual pruning
    assert [config.steps for config in configs] == [500, 500, 400]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without one")
def test_a_recipe_that_asks_for_a_gpu_fails_before_anything_is_built(tmp_path: Path) -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "digits-mlp.yaml")
    data = yaml.safe_load(recipe.to_yaml())
    data["variants"][1]["steps"].append({"distill": {"steps": 5, "loss": "kl", "device": "cuda"}})
    lines: list[str] = []
    with pytest.raises(
        RecipeError, match=r"distill\.device is cuda, but torch .* sees no CUDA GPU"
    ):
        build_family(parse_recipe(data), tmp_path / "models", progress=lines.append)
    assert lines == [] and not (tmp_path / "models").exists()
