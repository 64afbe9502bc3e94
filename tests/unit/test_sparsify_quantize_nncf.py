"""`quantize: {mode: static-nncf}`: NNCF post-training quantization of the exported ONNX.
The variant is a QDQ file that onnxruntime and OpenVINO both load and answer alike,
measured in its manifest like every other variant, for a classifier (digits CNN, the
mixed preset) and for a BERT-style embedder with two INT64 inputs (the transformer
preset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("nncf", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")

import onnx
import openvino

from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.sparsify.digits import load_digits_split
from sparseserve.sparsify.export import run_onnx
from sparseserve.sparsify.pipeline import build_family
from sparseserve.sparsify.precision import run_openvino
from sparseserve.sparsify.quality import fidelity
from sparseserve.sparsify.quantize import NncfPreset, OverflowFix, QuantizeConfig, QuantMode
from sparseserve.sparsify.recipe import RecipeError, apply_onnx, dump_step, parse_recipe, parse_step
from sparseserve.testing import onnx_models
from tests.unit.test_sparsify_embedding_recipe import token_batches

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CNN_RECIPE = {
    "family": "cnn",
    "base": {"architecture": "digits-cnn", "steps": [{"train": {"epochs": 3, "lr": 0.003}}]},
    "data": {"source": "sklearn-digits", "calibration_samples": 64},
    "variants": [
        {"name": "dense"},
        {"name": "int8-nncf", "steps": [{"quantize": {"mode": "static-nncf"}}]},
    ],
}
# The tiny BERT of test_sparsify_embedding_recipe (registered when that module imports).
BERT_RECIPE = {
    "family": "bert",
    "base": {"architecture": "test-tiny-bert"},
    "data": {"source": "test-random-tokens", "batch_size": 16, "calibration_samples": 32},
    "variants": [
        {"name": "dense"},
        {
            "name": "int8-static",
            "steps": [{"quantize": {"mode": "static-nncf", "preset": "transformer"}}],
        },
    ],
}


def build(recipe: dict, repository: Path) -> dict[str, VariantManifest]:
    built = build_family(parse_recipe(recipe), repository, progress=lambda line: None)
    return {variant.name: variant.manifest for variant in built}


def quality(manifest: VariantManifest) -> dict[str, float]:
    return {row.metric: row.value for row in manifest.quality}


def ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def runtime_precisions(model: bytes, layer_type: str) -> list[str]:
    """The precision OpenVINO's CPU plugin runs each `layer_type` layer of `model` at."""
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    found = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == layer_type:
            found.append(info["runtimePrecision"].astype(str))
    return found


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, VariantManifest]]:
    repository = tmp_path_factory.mktemp("nncf-cnn")
    return repository, build(CNN_RECIPE, repository)


def test_the_nncf_variant_is_a_qdq_model_measured_in_its_manifest(cnn: tuple) -> None:
    repository, manifests = cnn
    manifest = manifests["cnn.int8-nncf"]
    assert manifest == VariantManifest.read(repository / "cnn.int8-nncf" / MANIFEST_FILENAME)
    assert manifest.quantization == "int8 static QDQ (NNCF mixed)"
    assert manifest.method == "int8 static QDQ (NNCF mixed)"
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(repository / "cnn.int8-nncf/1/model.onnx")
    assert manifest.file_bytes < manifests["cnn.dense"].file_bytes
    (step,) = manifest.recipe["steps"]
    assert step["quantize"]["mode"] == "static-nncf"
    assert step["report"]["calibration_samples"] == 64
    assert (step["report"]["preset"], step["report"]["overflow_fix"]) == ("mixed", "enable")
    measured = quality(manifest)
    assert set(measured) == {"accuracy", "top1_agreement"}
    assert measured["accuracy"] > quality(manifests["cnn.dense"])["accuracy"] - 0.03
    assert measured["top1_agreement"] > 0.95


def test_the_nncf_variant_answers_alike_on_onnxruntime_and_openvino(cnn: tuple) -> None:
    repository, manifests = cnn
    model = (repository / "cnn.int8-nncf" / "1" / "model.onnx").read_bytes()
    split = load_digits_split(0)
    feed = {"image": split.x_test.reshape(-1, 1, 8, 8)}
    on_onnxruntime = run_onnx(model, feed)
    on_openvino = run_openvino(model, [feed])
    # The manifest's accuracy is onnxruntime's, on the same test split.
    accuracy = float((on_onnxruntime.argmax(axis=1) == split.y_test).mean())
    assert accuracy == quality(manifests["cnn.int8-nncf"])["accuracy"]
    # Two engines' int8 kernels round differently; the predictions barely move.
    assert (on_openvino.argmax(axis=1) == on_onnxruntime.argmax(axis=1)).mean() >= 0.98
    scale = np.abs(on_onnxruntime).max()
    assert np.abs(on_openvino - on_onnxruntime).max() < 0.1 * scale


def test_the_transformer_preset_quantizes_an_embedder_both_engines_run(tmp_path: Path) -> None:
    manifests = build(BERT_RECIPE, tmp_path)
    manifest = manifests["bert.int8-static"]
    assert manifest.quantization == "int8 static QDQ (NNCF transformer)"
    assert quality(manifest)["cosine_mean"] > 0.95
    path = tmp_path / "bert.int8-static" / "1" / "model.onnx"
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(path)
    model = path.read_bytes()
    batches = token_batches(24, 8, seed=5)
    on_onnxruntime = run_onnx(model, batches)
    on_openvino = run_openvino(model, batches)
    assert fidelity(on_onnxruntime, on_openvino).cosine_min > 0.99
    # OpenVINO fused the QDQ pairs: every linear layer (6 per encoder layer) runs int8.
    assert runtime_precisions(model, "FullyConnected") == ["i8"] * 12


def test_a_static_nncf_step_survives_a_yaml_round_trip() -> None:
    config = parse_step(
        {
            "quantize": {
                "mode": "static-nncf", "preset": "performance", "overflow_fix": "first_layer",
                "calibration_samples": 128,
            }
        }
    )  # fmt: skip
    assert config == QuantizeConfig(
        mode=QuantMode.static_nncf,
        preset=NncfPreset.performance,
        overflow_fix=OverflowFix.first_layer,
        calibration_samples=128,
    )
    assert parse_step(yaml.safe_load(yaml.safe_dump(dump_step(config)))) == config


def test_static_nncf_needs_calibration_rows(tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "mlp.onnx").read_bytes()
    with pytest.raises(RecipeError, match="static-nncf mode needs calibration rows"):
        apply_onnx(model, QuantizeConfig(mode=QuantMode.static_nncf))
