"""The demo repository: trained models a server can load, with manifests that tell the truth."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("onnx", reason="needs the [sparsify] extra")

import onnx
from onnx import numpy_helper

from sparseserve.sparsify.demo_models import DigitsSplit, build_demo_repository, load_digits_split

pytestmark = pytest.mark.slow

MODELS = ["digits-mlp.dense", "digits-mlp.pruned90", "digits-cnn.dense"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    assert build_demo_repository(path, seed=0) == MODELS
    return path


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


def _session(repository: Path, model: str) -> ort.InferenceSession:
    path = repository / model / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _manifest(repository: Path, model: str) -> VariantManifest:
    return VariantManifest.read(repository / model / MANIFEST_FILENAME)


def _test_inputs(session: ort.InferenceSession, split: DigitsSplit) -> dict[str, np.ndarray]:
    (model_input,) = session.get_inputs()
    return {model_input.name: split.x_test.reshape(-1, *model_input.shape[1:])}


@pytest.mark.parametrize("model", MODELS)
def test_each_model_is_in_triton_layout_with_a_valid_manifest(repository: Path, model: str) -> None:
    version_dir = repository / model / "1"
    # Only model.onnx: no temporary file left behind for a poller to trip over.
    assert [p.name for p in version_dir.iterdir()] == ["model.onnx"]
    manifest = _manifest(repository, model)
    assert f"{manifest.family}.{manifest.variant}" == model
    assert manifest.file_bytes == (version_dir / "model.onnx").stat().st_size
    assert manifest.nonzero_parameters is not None and manifest.parameters is not None
    assert 0 < manifest.nonzero_parameters <= manifest.parameters


def test_pruned_variant_names_its_dense_baseline(repository: Path) -> None:
    pruned = _manifest(repository, "digits-mlp.pruned90")
    assert pruned.baseline == "digits-mlp.dense"
    assert pruned.method == "magnitude"
    assert _manifest(repository, "digits-mlp.dense").is_baseline


def test_pruned_linear_weights_are_sparse_in_the_onnx_file(repository: Path) -> None:
    def weight_sparsity(model: str) -> dict[str, float]:
        graph = onnx.load(repository / model / "1" / "model.onnx").graph
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return {
            name: float((array == 0).mean())
            for name, array in weights.items()
            if name.endswith(".weight")
        }

    pruned = weight_sparsity("digits-mlp.pruned90")
    assert set(pruned) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(sparsity >= 0.9 for sparsity in pruned.values()), pruned
    assert all(sparsity < 0.1 for sparsity in weight_sparsity("digits-mlp.dense").values())

    manifest = _manifest(repository, "digits-mlp.pruned90")
    assert manifest.sparsity == pytest.approx(0.9, abs=1e-3)
    assert {layer.name: layer.sparsity for layer in manifest.layers} == pytest.approx(pruned)


@pytest.mark.parametrize("model", MODELS)
def test_manifest_accuracy_matches_onnxruntime(
    repository: Path, split: DigitsSplit, model: str
) -> None:
    session = _session(repository, model)
    (logits,) = session.run(["logits"], _test_inputs(session, split))
    accuracy = float((logits.argmax(axis=1) == split.y_test).mean())
    (quality,) = _manifest(repository, model).quality
    assert quality.metric == "accuracy"
    assert quality.samples == len(split.y_test)
    assert quality.value == pytest.approx(accuracy)


def test_dense_models_are_accurate_and_pruning_costs_little(repository: Path) -> None:
    def accuracy(model: str) -> float:
        return _manifest(repository, model).quality[0].value

    assert accuracy("digits-mlp.dense") > 0.93
    assert accuracy("digits-cnn.dense") > 0.93
    assert accuracy("digits-mlp.pruned90") >= accuracy("digits-mlp.dense") - 0.05
    pruned_quality = _manifest(repository, "digits-mlp.pruned90").quality[0]
    assert pruned_quality.baseline_value == accuracy("digits-mlp.dense")


@pytest.mark.parametrize("model", MODELS)
def test_batch_dimension_is_dynamic(repository: Path, split: DigitsSplit, model: str) -> None:
    session = _session(repository, model)
    assert session.get_inputs()[0].shape[0] == "batch"
    (name, batch) = next(iter(_test_inputs(session, split).items()))
    (one,) = session.run(["logits"], {name: batch[:1]})
    (seven,) = session.run(["logits"], {name: batch[:7]})
    assert one.shape == (1, 10)
    assert seven.shape == (7, 10)
    np.testing.assert_allclose(seven[:1], one, atol=1e-5)
