"""bench/engines.py in miniature: `--quick` on tiny models (a MiniLM-shaped embedder and
a small MLP) runs every engine, writes its JSON and Markdown, and never reports an f32
number under a bf16 label. The timings of such a run mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench.engines import Engine, EngineUnavailable, openvino_compile
from sparseserve.testing import onnx_models

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = 30522  # all-MiniLM-L6-v2's tokenizer: the ids the bench's texts encode to


def tiny_embedder(path: Path, width: int = 8, seed: int = 0) -> Path:
    """input_ids, attention_mask (INT64 [batch, sequence]) -> sentence_embedding (FP32
    [batch, width]): a random embedding table, mean-pooled over the real tokens, as the
    MiniLM variants' signature."""
    table = np.random.default_rng(seed).standard_normal((VOCABULARY, width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "sequence_axis"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["sentence_embedding"]),
    ]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sequence_axis"),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask")
    ]
    output = helper.make_tensor_value_info(
        "sentence_embedding", TensorProto.FLOAT, ["batch", width]
    )
    graph = helper.make_graph(nodes, "tiny_embedder", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_bf16_is_compiled_bf16_or_reported_unavailable(tmp_path: Path) -> None:
    """OpenVINO compiles f32 without a word where the CPU has no bf16: the bench reads the
    precision back, so a bf16 engine either compiled bf16 or says it is not available."""
    model = onnx_models.mlp(tmp_path / "mlp.onnx", sizes=(16, 32, 4))
    try:
        _, compiled_with = openvino_compile(model, Engine("openvino", "bf16"), 1, {})
    except EngineUnavailable as exc:
        assert "not available on this CPU" in str(exc)
        assert "compiled f32" in str(exc)
    else:
        assert compiled_with["INFERENCE_PRECISION_HINT"] == "bf16"
    _, compiled_with = openvino_compile(model, Engine("openvino", "fp32"), 1, {})
    assert compiled_with["INFERENCE_PRECISION_HINT"] == "f32"


@pytest.mark.slow  # loads the MiniLM tokenizer (transformers): about 10 s here
def test_quick_run_on_tiny_models(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the MiniLM tokenizer needs the [sparsify] extra")
    repository = tmp_path / "models"
    tiny_embedder(repository / "minilm.dense" / "1" / "model.onnx")
    tiny_embedder(repository / "minilm.int8" / "1" / "model.onnx", seed=1)
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.engines", "--quick", "--repository", str(repository),
         "--mlp", "16-32-4", "--output-dir", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "engines.json").read_text())
    markdown = (output / "engines.md").read_text()
    assert markdown.startswith("# CPU engines") and "## Summary" in markdown, markdown[:300]

    rows = {(row["model"], row["batch"], row["label"]): row for row in report["in_process"]}
    labels = ["onnxruntime fp32", "openvino fp32 static", "openvino fp32 dynamic",
              "openvino bf16 static", "openvino bf16 dynamic"]  # fmt: skip
    expected = [("minilm.dense", 1), ("minilm.dense", 8), ("minilm.int8", 1),
                ("minilm.int8", 8), ("mlp 16-32-4", 1), ("mlp 16-32-4", 32)]  # fmt: skip
    assert sorted(rows) == sorted((m, b, label) for m, b in expected for label in labels)
    assert any("minilm.structured: not in" in note for note in report["notes"])
    for (model, _, label), row in rows.items():
        if "fp32" in label:  # both engines run both models at fp32, and agree
            assert row["median_ms"] > 0, row
            if model == "minilm.dense":
                assert row["cosine_min"] > 0.9999, row
            if model.startswith("mlp"):
                assert row["relative_error"] < 1e-5, row
        elif report["bf16"] is not None:  # this CPU has no bf16: no bf16 number at all
            assert row["unavailable"] == "not available on this CPU", row
            assert "median_ms" not in row, row
        else:
            assert row["compiled_with"]["INFERENCE_PRECISION_HINT"] == "bf16", row
    # minilm.int8 is another model: its cosine to minilm.dense is measured, not 1.
    assert rows[("minilm.int8", 8, "onnxruntime fp32")]["cosine_mean"] < 0.99


@pytest.mark.slow
def test_openvino_paths_and_kernels_in_miniature(tmp_path: Path) -> None:
    """bench/openvino_paths.py and bench/openvino_kernels.py on a small static int8 MLP:
    every call path is timed (the same file, the same inputs), and the kernel list names
    each FullyConnected layer's kernel after a run (never "undef")."""
    path = onnx_models.static_int8_mlp(tmp_path / "int8.onnx", sparsity=0.9)
    beside = onnx_models.mlp(tmp_path / "beside.onnx")
    output = tmp_path / "results"
    for command in (
        ["bench.openvino_paths", "--onnx", str(path), "--beside", str(beside)],
        ["bench.openvino_kernels", "--onnx", str(path), "--batch", "1"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", *command, "--rounds", "1", "--runs", "2",
             "--output-dir", str(output)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    paths = json.loads((output / "openvino_paths.json").read_text())
    assert set(paths["median_ms"]) == {"bare", "server-config", "backend", "backend-beside"}
    assert all(ms > 0 for ms in paths["median_ms"].values())
    kernels = json.loads((output / "openvino_kernels.json").read_text())["rows"]
    assert len(kernels) == 4  # dynamic and fixed shape, each without and with the rate
    for row in kernels:
        assert sum(row["kernels"].values()) == 3, row  # the MLP's three layers
        assert not any(name.startswith("undef") for name in row["kernels"]), row
        assert row["sparse_kernel_layers"] >= 0
