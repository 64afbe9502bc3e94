"""Recipes: validation that names the bad field, YAML round trips of every step, and the
registry behind `apply`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")


from sparseserve.sparsify.recipe import (
    RecipeError,
    StepConfig,
    apply,
    dump_step,
    load_recipe,
    parse_recipe,
    parse_step,
    register_builtin_steps,
    register_step,
    step_types,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# Every field of a distill step (nested in the steps that distil, too).
DISTILL: dict[str, object] = {
    "steps": 40, "learning_rate": 0.001, "weight_decay": 0.01, "warmup_fraction": 0.2,
    "loss": "kl", "temperature": 3.0, "max_grad_norm": 2.0, "student_dropout": True,
    "cache_teacher": False, "teacher_cache_mb": 64, "log_every": 5, "seed": 7,
    "freeze": ["bert.embeddings"], "batch_size": 16, "precision": "bf16", "device": "cpu",
    "checkpoint_every": 20,
    "layerwise": {
        "hidden_weight": 0.5, "relation_weight": 2.0, "relation_heads": 8,
        "layer_map": [1, 3, 5],
    },
}  # fmt: skip

# One non-default instance of every registered step, as it would appear in YAML. A new
# step must add itself here, so that its round trip is tested too.
EXAMPLES: dict[str, dict[str, object]] = {
    "train": {
        "epochs": 3, "lr": 0.01, "batch_size": 16, "l1": 1e-4, "group_lasso": 2e-4,
        "dropout": 0.1, "dropconnect": 0.2, "near_zero_threshold": 0.01,
    },
    "magnitude_prune": {"sparsity": 0.75, "scope": "global"},
    "gradual_prune": {
        "initial_sparsity": 0.1, "final_sparsity": 0.8, "scope": "global", "epochs": 4,
        "frequency_steps": 7, "lr": 0.002, "batch_size": 8,
    },
    "nm_prune": {"n": 1, "m": 8},
    "structured_prune": {"sparsity": 0.25, "criterion": "l2"},
    "shrink": {},
    "quantize": {
        "mode": "static", "per_channel": False, "calibration_samples": 64,
        "calibration_batch": 16,
    },
    "encoder_prune": {
        "ffn_fraction": 0.3, "head_fraction": 0.5, "importance": "activation", "rounds": 3,
        "distill": DISTILL,
    },
    "distill": DISTILL,
    "encoder_drop_layers": {"keep": [0, 2, 5], "layers": None},
    "encoder_gradual_prune": {
        "initial_sparsity": 0.1, "final_sparsity": 0.85, "scope": "global",
        "frequency_steps": 5, "ramp_fraction": 0.6, "distill": DISTILL,
    },
    "precision": {"dtype": "bf16", "optional": True},
}  # fmt: skip


def mlp_recipe() -> dict:
    return yaml.safe_load((RECIPES / "digits-mlp.yaml").read_text())


def problem(data: dict) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    return str(caught.value)


@pytest.mark.parametrize("name", ["digits-mlp.yaml", "digits-cnn.yaml"])
def test_the_shipped_recipes_validate_and_have_the_required_variants(name: str) -> None:
    recipe = load_recipe(RECIPES / name)
    variants = {v.name for v in recipe.variants}
    assert {"dense", "pruned90", "structured50", "int8", "structured50-int8", "nm24"} <= variants
    assert recipe.baseline == "dense"


def test_the_minilm_recipe_validates_with_its_transformer_steps() -> None:
    from sparseserve.sparsify.distill import DistillConfig, DistillLoss
    from sparseserve.sparsify.encoder_gradual import EncoderGradualPruneConfig
    from sparseserve.sparsify.precision import PrecisionConfig
    from sparseserve.sparsify.quantize import NncfPreset, QuantizeConfig, QuantMode
    from sparseserve.sparsify.transformer import (
        EncoderDropLayersConfig,
        EncoderPruneConfig,
        Importance,
    )

    recipe = load_recipe(RECIPES / "minilm.yaml")
    variants = {v.name: v for v in recipe.variants}
    assert list(variants) == [
        "dense", "int8", "int8-static", "bf16", "structured", "structured-int8", "shallow",
        "sparse",
    ]  # fmt: skip
    assert (recipe.base.architecture, recipe.data.source, recipe.data.heldout_source) == (
        "all-minilm-l6-v2",
        "english-mix",
        "fortunes-literature",
    )
    prune, distill = variants["structured"].steps
    assert isinstance(prune, EncoderPruneConfig)
    assert (prune.ffn_fraction, prune.head_fraction, prune.importance, prune.rounds) == (
        0.5,
        0.25,
        Importance.reconstruction,
        1,
    )
    assert prune.reconstruct is not None and prune.reconstruct.ridge == 0.0001
    assert isinstance(distill, DistillConfig)
    assert (distill.loss, distill.freeze) == (DistillLoss.cosine_mse, ("bert.embeddings",))
    assert distill.layerwise is not None
    assert variants["structured-int8"].parent == "structured"
    assert variants["structured-int8"].steps == [QuantizeConfig()]
    (static,) = variants["int8-static"].steps
    assert isinstance(static, QuantizeConfig)
    assert (static.mode, static.preset) == (QuantMode.static_nncf, NncfPreset.transformer)
    assert variants["bf16"].steps == [PrecisionConfig(dtype="bf16", optional=True)]
    drop, recovery = variants["shallow"].steps
    assert drop == EncoderDropLayersConfig.model_validate(
        {"keep": [0, 2, 4, 5], "reconstruct": {"ridge": 0.0001}}
    )
    assert recovery == distill.model_copy(update={"steps": 500})
    (gradual,) = variants["sparse"].steps
    assert isinstance(gradual, EncoderGradualPruneConfig)
    assert 0.8 <= gradual.final_sparsity <= 0.9


@pytest.mark.parametrize("name", ["digits-mlp.yaml", "digits-cnn.yaml", "minilm.yaml"])
def test_a_recipe_survives_a_yaml_round_trip(name: str) -> None:
    recipe = load_recipe(RECIPES / name)
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


def test_every_registered_step_has_an_example() -> None:
    register_builtin_steps()
    assert set(step_types()) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_step_survives_a_yaml_round_trip(name: str) -> None:
    register_builtin_steps()
    config = parse_step({name: EXAMPLES[name]})
    text = yaml.safe_dump(dump_step(config))
    assert parse_step(yaml.safe_load(text)) == config
    # Every field of the example was set: the round trip covers the whole config.
    assert dump_step(config)[name] == {**config.model_dump(mode="json"), **EXAMPLES[name]}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (
            lambda d: d["variants"][1]["steps"][0]["gradual_prune"].update(final_sparsity=1.0),
            "variants.1.steps: item 0: gradual_prune.final_sparsity: Input should be less than 1",
        ),
        (
            lambda d: d["variants"][1]["steps"][0]["gradual_prune"].update(sparsity=0.5),
            "gradual_prune.sparsity: Extra inputs are not permitted",
        ),
        (
            lambda d: d["variants"][1]["steps"][0]["gradual_prune"].update(scope="diagonal"),
            "gradual_prune.scope: Input should be 'per_layer', 'global' or 'per_row'",
        ),
        (
            lambda d: d["variants"][1]["steps"].append({"prune_harder": {}}),
            "unknown step 'prune_harder' (known steps: distill, encoder_drop_layers, "
            "encoder_gradual_prune, encoder_prune,",
        ),
        (
            lambda d: d["variants"][1]["steps"].append({"train": {}, "shrink": {}}),
            "a step is a mapping with one key",
        ),
        (
            lambda d: d["variants"][1].update({"from": "nm24"}),
            "variants.1.from: 'nm24' is not an earlier variant",
        ),
        (lambda d: d.update(baseline="sparse"), "baseline: 'sparse' is not one of the variants"),
        (
            lambda d: d["variants"][0].update(steps=[{"precision": "bf16"}]),
            "baseline: 'dense' has a precision step; the baseline is the fp32 reference",
        ),
        (
            lambda d: d["variants"][1]["steps"].insert(0, {"quantize": {}}),
            "torch steps must come before ONNX steps",
        ),
        (
            lambda d: d["variants"][1].update(name="Pruned 90"),
            "variants.1.name: String should match pattern",
        ),
        (lambda d: d["data"].update(test_fraction=1), "data.test_fraction"),
        (lambda d: d.update(version=2), "version: Input should be 1"),
        (lambda d: d["export"].update(exporter="pickle"), "export.exporter"),
        (lambda d: d.update(variants=[]), "variants: List should have at least 1 item"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_field(mutate, expected: str) -> None:
    data = copy.deepcopy(mlp_recipe())
    mutate(data)
    message = problem(data)
    assert message.startswith("recipe: invalid recipe: ")
    assert expected in message


@pytest.mark.parametrize(
    ("step", "fields", "expected"),
    [
        ("nm_prune", {"n": 4, "m": 4}, "n must be smaller than m"),
        ("magnitude_prune", {"sparsity": -0.1}, "sparsity: Input should be greater than or"),
        ("magnitude_prune", {}, "sparsity: Field required"),
        ("gradual_prune", {"initial_sparsity": 0.5, "final_sparsity": 0.2, "epochs": 1}, "final"),
        ("train", {"epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
        ("train", {"epochs": 1, "dropout": 1.0}, "train.dropout: Input should be less than 1"),
        ("quantize", {"mode": "int4"}, "quantize.mode: Input should be"),
        (
            "quantize",
            {"mode": "dynamic", "preset": "mixed"},
            "quantize: preset: only mode static-nncf takes it, not dynamic",
        ),
        ("quantize", {"mode": "static-nncf", "preset": "fast"}, "quantize.preset: Input should"),
        (
            "quantize",
            {"mode": "static-nncf", "per_channel": False},
            "per_channel: static-nncf quantizes weights per channel",
        ),
        ("precision", "fp16", "precision.dtype: Input should be 'bf16'"),
        ("precision", {"optional": True}, "precision.dtype: Field required"),
        ("encoder_prune", {"ffn_fraction": 1.0}, "encoder_prune.ffn_fraction: Input should be"),
        ("encoder_prune", {"importance": "random"}, "encoder_prune.importance: Input should be"),
        ("encoder_prune", {"heads": 2}, "encoder_prune.heads: Extra inputs are not permitted"),
        ("distill", {"steps": 0}, "distill.steps: Input should be greater than or equal to 1"),
        ("distill", {"loss": "l1"}, "distill.loss: Input should be"),
        ("distill", {"freeze": ["bert embeddings"]}, "distill.freeze.0: String should match"),
    ],
)
def test_a_bad_step_is_refused_naming_the_field(step: str, fields: dict, expected: str) -> None:
    register_builtin_steps()
    with pytest.raises(ValueError) as caught:
        parse_step({step: fields})
    assert expected in str(caught.value)


def test_a_step_may_be_written_as_its_one_value() -> None:
    from sparseserve.sparsify.precision import PrecisionConfig

    register_builtin_steps()
    assert parse_step({"precision": "bf16"}) == PrecisionConfig(dtype="bf16")
    assert parse_step({"precision": {"dtype": "bf16"}}) == PrecisionConfig(dtype="bf16")
    with pytest.raises(ValueError, match="train: Input should be a valid dictionary"):
        parse_step({"train": 3})  # a step without a shorthand takes a mapping only


def test_a_recipe_file_that_is_not_yaml_says_so(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("family: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(path)


def test_an_unknown_architecture_names_the_field(tmp_path: Path) -> None:
    from sparseserve.sparsify.pipeline import build_family

    data = mlp_recipe()
    data["base"]["architecture"] = "resnet-9000"
    with pytest.raises(RecipeError, match=r"base.architecture: unknown architecture 'resnet-9000'"):
        build_family(parse_recipe(data), tmp_path)


def test_a_step_name_cannot_be_taken_twice() -> None:
    register_builtin_steps()

    class Impostor(StepConfig):
        step = "train"

    with pytest.raises(ValueError, match="already registered"):
        register_step(Impostor)(lambda model, config, context: {})


def test_an_onnx_step_is_refused_by_the_torch_api() -> None:
    from torch import nn

    from sparseserve.sparsify.quantize import QuantizeConfig

    with pytest.raises(RecipeError, match="runs on the onnx model"):
        apply(nn.Linear(4, 4), QuantizeConfig())


def test_a_training_step_without_data_says_what_it_needs() -> None:
    from torch import nn

    from sparseserve.sparsify.train import TrainConfig

    with pytest.raises(RecipeError, match="needs data"):
        apply(nn.Linear(4, 4), TrainConfig(epochs=1))
