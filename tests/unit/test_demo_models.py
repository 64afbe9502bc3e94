"""The demo repository (both digits recipes): trained models a server can load, with
manifests that tell the truth, and 90% sparsity within a point of dense accuracy."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("onnx", reason="needs the [sparsify] extra")

import onnx
from onnx import numpy_helper

from sparseserve.sparsify.demo_models import DigitsSplit, load_digits_split

pytestmark = pytest.mark.slow

MLP_VARIANTS = ("dense", "pruned90", "structured50", "l1-pruned90", "int8",
                "structured50-int8", "nm24")  # fmt: skip
CNN_VARIANTS = ("dense", "pruned90", "structured50", "int8", "int8-nncf", "structured50-int8",
                "nm24")  # fmt: skip
MODELS = [f"digits-mlp.{v}" for v in MLP_VARIANTS] + [f"digits-cnn.{v}" for v in CNN_VARIANTS]


@pytest.fixture(scope="module")
def repository(demo_repository: Path) -> Path:
    return demo_repository


def test_the_demo_builds_every_variant_of_both_recipes(demo_repository: Path) -> None:
    assert sorted(p.name for p in demo_repository.iterdir()) == sorted(MODELS)


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


@pytest.mark.parametrize("family", ["digits-mlp", "digits-cnn"])
def test_variants_name_their_dense_baseline(repository: Path, family: str) -> None:
    pruned = _manifest(repository, f"{family}.pruned90")
    assert pruned.baseline == f"{family}.dense"
    assert pruned.method.startswith("gradual magnitude 0%->90% (cubic)")
    assert _manifest(repository, f"{family}.dense").is_baseline


def _onnx_weights(repository: Path, model: str) -> dict[str, np.ndarray]:
    """Every weight of the file, dense or stored as a sparse initializer."""
    graph = onnx.load(repository / model / "1" / "model.onnx").graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for sparse in graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sparse.dims)), dtype=np.float32)
        dense[numpy_helper.to_array(sparse.indices)] = numpy_helper.to_array(sparse.values)
        weights[sparse.values.name] = dense.reshape(tuple(sparse.dims))
    return weights


def test_pruned_weights_are_sparse_in_the_onnx_file(repository: Path) -> None:
    def weight_sparsity(model: str) -> dict[str, float]:
        return {
            name: float((array == 0).mean())
            for name, array in _onnx_weights(repository, model).items()
            if name.endswith(".weight")
        }

    pruned = weight_sparsity("digits-mlp.pruned90")
    assert set(pruned) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(sparsity < 0.1 for sparsity in weight_sparsity("digits-mlp.dense").values())

    manifest = _manifest(repository, "digits-mlp.pruned90")
    assert manifest.sparsity == pytest.approx(0.9, abs=1e-3)  # one global threshold
    assert {layer.name: layer.sparsity for layer in manifest.layers} == pytest.approx(pruned)
    # Stored compactly, and smaller for it.
    assert manifest.file_bytes < _manifest(repository, "digits-mlp.dense").file_bytes / 2


@pytest.mark.parametrize("model", MODELS)
def test_manifest_accuracy_matches_onnxruntime(
    repository: Path, split: DigitsSplit, model: str
) -> None:
    session = _session(repository, model)
    (logits,) = session.run(["logits"], _test_inputs(session, split))
    accuracy = float((logits.argmax(axis=1) == split.y_test).mean())
    quality = _manifest(repository, model).quality[0]
    assert quality.metric == "accuracy"
    assert quality.samples == len(split.y_test)
    assert quality.value == pytest.approx(accuracy)


@pytest.mark.parametrize("family", ["digits-mlp", "digits-cnn"])
def test_ninety_percent_sparsity_within_one_point_of_dense(repository: Path, family: str) -> None:
    def accuracy(model: str) -> float:
        return _manifest(repository, model).quality[0].value

    dense = accuracy(f"{family}.dense")
    assert dense > 0.93
    assert accuracy(f"{family}.pruned90") >= dense - 0.01
    assert _manifest(repository, f"{family}.pruned90").quality[0].baseline_value == dense
    for variant in ("structured50", "int8", "structured50-int8", "nm24"):
        assert accuracy(f"{family}.{variant}") >= dense - 0.02, variant


@pytest.mark.parametrize("model", MODELS)
def test_batch_dimension_is_dynamic(repository: Path, split: DigitsSplit, model: str) -> None:
    session = _session(repository, model)
    assert session.get_inputs()[0].shape[0] == "batch"
    (name, batch) = next(iter(_test_inputs(session, split).items()))
    (one,) = session.run(["logits"], {name: batch[:1]})
    (seven,) = session.run(["logits"], {name: batch[:7]})
    assert one.shape == (1, 10)
    assert seven.shape == (7, 10)
    quantization = _manifest(repository, model).quantization or ""
    if "dynamic" in quantization:
        # Dynamic int8 picks the activation scale from the whole batch, so a row's logits
        # depend (a little) on the rows batched with it.
        np.testing.assert_allclose(seven[:1], one, atol=0.05 * np.abs(one).max())
        assert seven[0].argmax() == one[0].argmax()
    else:
        np.testing.assert_allclose(seven[:1], one, atol=1e-5)
