"""A model made outside sparseserve: `inspect` measures any ONNX file (dense, pruned,
2:4, quantized, sparse initializers) from its weights, and `sparseserve manifest`
writes a sparseserve.yaml for it with those numbers and its quality against the
baseline, run on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from sparseserve.cli import main
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.repository.weights import follows_n_m, weights_of
from sparseserve.testing import onnx_models

SIZES = (64, 256, 256, 10)
LAYER_WEIGHTS = 64 * 256 + 256 * 256 + 256 * 10
BIASES = 256 + 256 + 10


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A family made "elsewhere": a dense MLP and variants of the same seed."""
    root = tmp_path / "models"
    onnx_models.mlp(root / "mlp.dense" / "1" / "model.onnx", SIZES)
    onnx_models.mlp(root / "mlp.pruned75" / "1" / "model.onnx", SIZES, sparsity=0.75)
    onnx_models.mlp(root / "mlp.nm24" / "1" / "model.onnx", SIZES, pattern_2_4=True)
    return root


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_weights_of_a_dense_and_a_pruned_model(repository: Path) -> None:
    dense = weights_of(repository / "mlp.dense" / "1" / "model.onnx")
    assert [layer.shape for layer in dense.layers] == [(64, 256), (256, 256), (256, 10)]
    assert dense.parameters == LAYER_WEIGHTS + BIASES
    assert dense.sparsity == 0.0 and not dense.follows_2_4 and dense.quantization is None
    assert dense.file_bytes == (repository / "mlp.dense" / "1" / "model.onnx").stat().st_size

    pruned = weights_of(repository / "mlp.pruned75" / "1" / "model.onnx")
    assert [layer.sparsity for layer in pruned.layers] == [0.75, 0.75, 0.75]
    assert pruned.sparsity == 0.75
    assert pruned.nonzero_parameters == LAYER_WEIGHTS // 4 + BIASES
    assert [layer.consumers for layer in pruned.layers] == [("Gemm",)] * 3
    assert not pruned.follows_2_4  # 75% zeros, but not in the 2-of-4 pattern


def test_the_2_4_pattern_is_recognised_along_either_axis(repository: Path) -> None:
    nm = weights_of(repository / "mlp.nm24" / "1" / "model.onnx")
    assert nm.follows_2_4 and all(layer.follows_2_4 for layer in nm.layers)
    assert nm.sparsity == 0.5
    weight = numpy_helper.to_array(
        onnx.load(str(repository / "mlp.nm24" / "1" / "model.onnx")).graph.initializer[0]
    )
    assert follows_n_m(weight) and follows_n_m(weight.T)
    broken = weight.copy()
    broken[np.flatnonzero(broken[:, 0] == 0)[0], 0] = 1.0  # 3 non-zeros in one group
    assert not follows_n_m(broken)


def test_quantized_operators_and_integer_weights_are_reported(
    repository: Path, tmp_path: Path
) -> None:
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(
        repository / "mlp.dense" / "1" / "model.onnx", quantized, weight_type=QuantType.QInt8
    )
    w = weights_of(quantized)
    assert w.quantized_ops == {"MatMulInteger": 3, "DynamicQuantizeLinear": 3}
    assert [layer.dtype for layer in w.layers] == ["int8"] * 3
    assert w.quantization is not None and w.quantization.startswith("int8 weights (")
    assert "MatMulInteger x3" in w.quantization


def test_sparse_initializers_are_measured_as_the_dense_tensor(
    repository: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(repository / "mlp.pruned75" / "1" / "model.onnx"))
    first = model.graph.initializer[0]
    array = numpy_helper.to_array(first)
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(flat[positions], first.name),
            numpy_helper.from_array(positions.astype(np.int64), f"{first.name}.indices"),
            list(array.shape),
        )
    )
    model.graph.initializer.remove(first)
    path = tmp_path / "sparse.onnx"
    onnx.save(model, str(path))
    w = weights_of(path)
    assert w.sparse_initializers == 1
    assert [layer.sparsity for layer in w.layers] == [0.75, 0.75, 0.75]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(  # onnxruntime reads it as the same model
        run(path, x), run(repository / "mlp.pruned75" / "1" / "model.onnx", x)
    )


def test_inspect_an_onnx_file_and_a_directory_without_manifest(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(repository / "mlp.nm24" / "1" / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "sparsity:     50.00% of the 84,480 layer weights are zero" in out
    assert "2:4 pattern:  yes" in out and "quantization: none" in out
    assert "KiB on disk" in out

    assert main(["inspect", str(repository / "mlp.pruned75")]) == 0
    out = capsys.readouterr().out
    assert "no sparseserve.yaml" in out and "`sparseserve manifest`" in out
    assert "1/model.onnx" in out and "75.00%" in out

    # A version folder: its file (it was refused: "holds neither <version>/*.onnx files").
    assert main(["inspect", str(repository / "mlp.nm24" / "1")]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "2:4 pattern:  yes" in out


def test_inspect_a_file_that_is_not_onnx(tmp_path: Path, capsys) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x00\xffnot a model")
    assert main(["inspect", str(tmp_path / "model.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparseserve: error: ") and "not a readable ONNX model" in err


def test_manifest_measures_sparsity_and_quality_against_the_baseline(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(7).standard_normal((300, 64))  # float64: converted to fp32
    dense = run(repository / "mlp.dense" / "1" / "model.onnx", x.astype(np.float32))
    pruned = run(repository / "mlp.pruned75" / "1" / "model.onnx", x.astype(np.float32))
    labels = dense.argmax(axis=1)  # so the baseline scores 100%
    np.savez(tmp_path / "data.npz", pixels=x, labels=labels)

    assert main([
        "manifest", str(repository / "mlp.pruned75"), "--family", "mlp",
        "--variant", "pruned75", "--baseline", "mlp.dense", "--data", str(tmp_path / "data.npz"),
    ]) == 0  # fmt: skip
    assert "sparsity 75.00%" in capsys.readouterr().out
    manifest = VariantManifest.read(repository / "mlp.pruned75" / MANIFEST_FILENAME)
    assert (manifest.family, manifest.variant, manifest.baseline) == (
        "mlp",
        "pruned75",
        "mlp.dense",
    )
    assert manifest.sparsity == 0.75 and len(manifest.layers) == 3
    assert manifest.nonzero_parameters == LAYER_WEIGHTS // 4 + BIASES
    assert manifest.task.value == "classification"
    assert "75% zeros" in manifest.method
    quality = {q.metric: q for q in manifest.quality}
    agreement = float((pruned.argmax(axis=1) == labels).mean())
    assert quality["accuracy"].value == pytest.approx(agreement)
    assert quality["accuracy"].baseline_value == 1.0
    assert quality["top1_agreement"].value == pytest.approx(agreement)
    cosines = (pruned * dense).sum(axis=1) / (
        np.linalg.norm(pruned, axis=1) * np.linalg.norm(dense, axis=1)
    )
    assert quality["cosine_mean"].value == pytest.approx(cosines.mean(), rel=1e-5)
    assert quality["cosine_min"].value == pytest.approx(cosines.min(), rel=1e-5)
    assert all(q.samples == 300 and q.dataset == "data.npz" for q in manifest.quality)

    # The baseline itself, and a 2:4 variant whose method export-triton reads.
    assert main(["manifest", str(repository / "mlp.dense"), "--family", "mlp",
                 "--variant", "dense"]) == 0  # fmt: skip
    assert VariantManifest.read(repository / "mlp.dense" / MANIFEST_FILENAME).is_baseline
    assert main(["manifest", str(repository / "mlp.nm24"), "--family", "mlp",
                 "--variant", "nm24", "--baseline", "mlp.dense"]) == 0  # fmt: skip
    assert "2:4" in VariantManifest.read(repository / "mlp.nm24" / MANIFEST_FILENAME).method


def test_manifest_reads_the_eval_npz_that_sparsify_writes(repository: Path, tmp_path: Path) -> None:
    """`--data` given a family's own eval.npz (labels as `__labels__`, a `__description__`
    beside the inputs) measures accuracy too (it recorded none, without a word)."""
    from sparseserve.repository.eval_data import write_eval_data

    x = np.random.default_rng(8).standard_normal((200, 64)).astype(np.float32)
    labels = run(repository / "mlp.dense" / "1" / "model.onnx", x).argmax(axis=1)
    data = write_eval_data(tmp_path / "eval.npz", {"pixels": x}, "random rows", labels)
    assert main([
        "manifest", str(repository / "mlp.pruned75"), "--family", "mlp",
        "--variant", "pruned75", "--baseline", "mlp.dense", "--data", str(data),
    ]) == 0  # fmt: skip
    quality = {q.metric: q for q in VariantManifest.read(
        repository / "mlp.pruned75" / MANIFEST_FILENAME).quality}  # fmt: skip
    assert quality["accuracy"].baseline_value == 1.0
    assert quality["accuracy"].samples == 200


def test_manifest_refuses_what_it_cannot_measure(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(*args: str) -> str:
        assert main(["manifest", *args, "--family", "mlp", "--variant", "v"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sparseserve: error: ")
        return err

    np.savez(tmp_path / "wrong.npz", a=np.zeros((2, 64)), b=np.zeros((2, 64)))
    pruned = str(repository / "mlp.pruned75")
    assert "the model's inputs are ['input']" in fails(
        pruned, "--baseline", "mlp.dense", "--data", str(tmp_path / "wrong.npz")
    )
    # Rows of the wrong width: what the model takes and what the data gives, not
    # onnxruntime's bare INVALID_ARGUMENT without the file.
    np.savez(tmp_path / "narrow.npz", input=np.zeros((2, 60), np.float32))
    narrow = fails(pruned, "--baseline", "mlp.dense", "--data", str(tmp_path / "narrow.npz"))
    assert "--data does not fit" in narrow and "mlp.pruned75/1/model.onnx" in narrow, narrow
    assert (
        "it takes input tensor(float)[" in narrow
        and "the data gives input float32[2, 60]" in narrow
    )
    assert "--baseline 'mlp.nope': no model directory" in fails(pruned, "--baseline", "mlp.nope")
    # A variant's name where the model's goes, as a traffic policy would take it.
    assert "beside this one, e.g. 'mlp.dense'" in fails(pruned, "--baseline", "dense")
    assert "holds no <version>/*.onnx" in fails(str(tmp_path))
    assert main(["manifest", pruned, "--family", "mlp", "--variant", "v"]) == 0
    assert "exists (--force replaces it)" in fails(pruned)
