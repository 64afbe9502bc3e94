"""Quantized outputs stay close to float; export matches torch; sparse storage shrinks the
file and changes no output."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("onnx", reason="needs the [sparsify] extra")

import onnx
import torch

from sparseserve.sparsify.digits import cnn, load_digits_split, mlp
from sparseserve.sparsify.export import export_onnx, run_onnx, sparse_storage, write_variant
from sparseserve.sparsify.prune import MagnitudePruneConfig, NMPruneConfig, bake
from sparseserve.sparsify.quantize import QuantizeConfig, QuantMode, float_node_types
from sparseserve.sparsify.recipe import Exporter, RecipeError, TrainingData, apply, apply_onnx
from sparseserve.sparsify.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained() -> dict[str, object]:
    """A briefly trained MLP and CNN with their float exports (built once)."""
    split = load_digits_split(0)
    images = split.x_train.reshape(-1, 1, 8, 8)
    models = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for name, build, x in (("mlp", mlp, split.x_train), ("cnn", cnn, images)):
            model = build()
            data = TrainingData(x, split.y_train, x[:128])
            apply(model, TrainConfig(epochs=3, lr=0.003), data=data)
            models[name] = (model.eval(), data)
        torch.set_num_threads(threads)
    return {"split": split, **models}


def float_export(model, name: str) -> tuple[bytes, str, tuple[int, ...]]:
    shape = (64,) if name == "mlp" else (1, 8, 8)
    return export_onnx(model, {"input": torch.zeros(2, *shape)}, "logits"), "input", shape


def ops(onnx_model: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(onnx_model).graph.node}


@pytest.mark.parametrize(
    ("name", "config", "int8_ops", "tolerance"),
    [
        # Measured: dynamic 0.5-0.8% of the largest logit, static (activations too) 5-6%,
        # fp16 0.01%.
        ("mlp", QuantizeConfig(), {"MatMulInteger", "DynamicQuantizeLinear"}, 0.02),
        ("cnn", QuantizeConfig(), {"ConvInteger", "DynamicQuantizeLinear"}, 0.02),
        ("mlp", QuantizeConfig(mode=QuantMode.static), {"QuantizeLinear"}, 0.1),
        ("cnn", QuantizeConfig(mode=QuantMode.static), {"QuantizeLinear"}, 0.1),
        ("mlp", QuantizeConfig(per_channel=False), {"MatMulInteger"}, 0.02),
        ("mlp", QuantizeConfig(mode=QuantMode.fp16), {"Cast"}, 0.001),
    ],
)
def test_quantized_outputs_are_close_to_float(
    trained: dict, name: str, config: QuantizeConfig, int8_ops: set[str], tolerance: float
) -> None:
    model, data = trained[name]
    split = trained["split"]
    x = split.x_test.reshape(-1, *data.x_train.shape[1:])
    float_model, input_name, _ = float_export(model, name)
    quantized, report = apply_onnx(float_model, config, data=data, input_name=input_name)
    assert int8_ops <= ops(quantized)
    assert report["bytes_after"] == len(quantized) < len(float_model)
    expected = run_onnx(float_model, {input_name: x})
    actual = run_onnx(quantized, {input_name: x})
    assert actual.dtype == np.float32  # clients keep sending and receiving float32
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() < tolerance * scale
    agreement = (actual.argmax(axis=1) == expected.argmax(axis=1)).mean()
    assert agreement >= 0.98


def test_static_quantization_needs_calibration_rows(trained: dict) -> None:
    model, _ = trained["mlp"]
    float_model, _, _ = float_export(model, "mlp")
    with pytest.raises(RecipeError, match="calibration"):
        apply_onnx(float_model, QuantizeConfig(mode=QuantMode.static))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_legacy_export_matches_torch(trained: dict, name: str) -> None:
    model, data = trained[name]
    x = trained["split"].x_test.reshape(-1, *data.x_train.shape[1:])
    onnx_model, input_name, _ = float_export(model, name)
    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(
        run_onnx(onnx_model, {input_name: x}), expected, atol=1e-5, rtol=1e-5
    )


def test_dynamo_export_matches_torch(trained: dict) -> None:
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    model, _ = trained["cnn"]
    x = trained["split"].x_test.reshape(-1, 1, 8, 8)
    example = {"image": torch.zeros(2, 1, 8, 8)}
    onnx_model = export_onnx(model, example, "logits", exporter=Exporter.dynamo)
    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(run_onnx(onnx_model, {"image": x}), expected, atol=1e-5, rtol=1e-5)
    assert onnx.load_from_string(onnx_model).graph.input[0].name == "image"


def test_sparse_storage_shrinks_a_pruned_model_and_changes_no_output(trained: dict) -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    apply(model, MagnitudePruneConfig(sparsity=0.9))
    bake(model)
    dense, input_name, _ = float_export(model, "mlp")
    compact, moved = sparse_storage(dense)
    assert moved == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert len(compact) < 0.4 * len(dense)
    graph = onnx.load_from_string(compact).graph
    assert {s.values.name for s in graph.sparse_initializer} == set(moved)
    x = trained["split"].x_test
    np.testing.assert_array_equal(
        run_onnx(compact, {input_name: x}), run_onnx(dense, {input_name: x})
    )


def test_sparse_storage_leaves_weights_where_it_would_be_larger() -> None:
    torch.manual_seed(0)
    model = mlp().eval()
    apply(model, NMPruneConfig())  # 50% zeros: values + int64 indices outweigh dense
    bake(model)
    dense, _, _ = float_export(model, "mlp")
    assert sparse_storage(dense) == (onnx.load_from_string(dense).SerializeToString(), [])


def test_write_variant_lays_out_the_model_in_triton_layout(tmp_path, trained: dict) -> None:
    from sparseserve.repository.manifest import VariantManifest

    model, _ = trained["mlp"]
    onnx_model, _, _ = float_export(model, "mlp")
    manifest = VariantManifest(family="f", variant="v", file_bytes=len(onnx_model))
    directory = write_variant(tmp_path, "f.v", onnx_model, manifest)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "f.v", "f.v/1", "f.v/1/model.onnx", "f.v/sparseserve.yaml",
    ]  # fmt: skip
    assert VariantManifest.read(directory / "sparseserve.yaml") == manifest


class Tokens(torch.nn.Module):
    """Two linear layers over [batch, tokens, 16]: exported as MatMul + Add, as BERT's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("mode", [QuantMode.dynamic, QuantMode.static])
def test_keep_float_leaves_the_named_nodes_float(mode: QuantMode) -> None:
    """`keep_float` keeps the nodes whose names contain a pattern in float (here the first
    layer's MatMul) and quantizes the rest; the label and the report say so."""
    torch.manual_seed(0)
    float_model = export_onnx(Tokens().eval(), {"input": torch.zeros(2, 5, 16)}, "out")
    names = {n.name: n.op_type for n in onnx.load_from_string(float_model).graph.node}
    assert names["/fc1/MatMul"] == names["/fc2/MatMul"] == "MatMul"
    x = np.random.default_rng(0).standard_normal((64, 5, 16)).astype(np.float32)
    data = TrainingData(x, None, x)
    config = QuantizeConfig(mode=mode, keep_float=("/fc1/",))
    quantized, report = apply_onnx(float_model, config, data=data, input_name="input")
    floats = float_node_types(onnx.load_from_string(quantized))
    assert floats["/fc1/MatMul"] == "MatMul"
    assert "/fc2/MatMul" not in floats  # quantized
    assert report["float_nodes"] == 2  # fc1's MatMul and its bias Add
    assert config.label().endswith(", float: /fc1/")
    whole, _ = apply_onnx(float_model, QuantizeConfig(mode=mode), data=data, input_name="input")
    assert "/fc1/MatMul" not in float_node_types(onnx.load_from_string(whole))


def test_keep_float_on_a_gemm_that_dynamic_mode_rewrites_is_refused(trained: dict) -> None:
    model, _ = trained["mlp"]
    float_model, _, _ = float_export(model, "mlp")
    with pytest.raises(RecipeError, match="rewrote /fc1/Gemm"):
        apply_onnx(float_model, QuantizeConfig(keep_float=("/fc1/",)))


def test_keep_float_names_a_node_and_only_onnxruntime_modes_take_it(trained: dict) -> None:
    model, _ = trained["mlp"]
    float_model, _, _ = float_export(model, "mlp")
    with pytest.raises(RecipeError, match=r"keep_float '/fc9/' matches no node.*/fc1/Gemm"):
        apply_onnx(float_model, QuantizeConfig(keep_float=("/fc9/",)))
    with pytest.raises(ValueError, match="only modes dynamic and static"):
        QuantizeConfig(mode=QuantMode.static_nncf, keep_float=("/fc1/",))
    with pytest.raises(ValueError, match="empty string"):
        QuantizeConfig(keep_float=("",))
