"""The recipe pipeline on an embedder with two INT64 inputs of any batch and sequence
length: a tiny random BERT wrapped like MiniLM, pruned with ``encoder_prune``, recovered
with ``distill`` and quantized, measured by the embedding quality rows. The real MiniLM
goes through the same path in tests/e2e/test_minilm.py (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")

import onnx
import torch

from sparseserve.repository.manifest import MANIFEST_FILENAME, Task, VariantManifest
from sparseserve.sparsify.catalog import (
    Architecture,
    LabelledData,
    ModelInput,
    architecture,
    load_data,
    register_architecture,
    register_data_source,
)
from sparseserve.sparsify.digits import load_digits_split, mlp
from sparseserve.sparsify.distill import DistillConfig, DistillLoss
from sparseserve.sparsify.export import run_onnx
from sparseserve.sparsify.minilm import SentenceEmbedder
from sparseserve.sparsify.pipeline import build_family
from sparseserve.sparsify.recipe import DataConfig, RecipeError, TrainingData, apply, parse_recipe
from tests.unit.tiny_bert import FFN, HIDDEN, VOCAB, tiny_bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ("input_ids", "attention_mask")


def tiny_embedder() -> SentenceEmbedder:
    return SentenceEmbedder(tiny_bert()).eval()


def token_batches(count: int, batch_size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Random token ids, each batch padded to its own length, with padded rows."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, count, batch_size):
        rows = min(batch_size, count - start)
        width = int(rng.integers(6, 20))
        lengths = rng.integers(3, width + 1, size=rows)
        mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
        ids = rng.integers(1, VOCAB, size=(rows, width)).astype(np.int64) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@register_data_source("test-random-tokens")
def _random_tokens(config: DataConfig, _architecture: Architecture) -> LabelledData:
    return LabelledData(
        x_train=token_batches(config.train_samples or 128, config.batch_size, config.seed),
        y_train=None,
        x_test=token_batches(config.test_samples or 48, config.batch_size, config.seed + 1),
        y_test=None,
        test_description="random token ids",
    )


register_architecture(
    Architecture(
        "test-tiny-bert",
        tiny_embedder,
        tuple(ModelInput(name, (None,), "int64") for name in NAMES),
        "a 2-layer BERT with random weights, mean-pooled and normalised",
        output_name="sentence_embedding",
        task=Task.embedding,
    )
)

RECIPE = {
    "family": "tiny",
    "base": {"architecture": "test-tiny-bert"},
    "data": {"source": "test-random-tokens", "batch_size": 16, "calibration_samples": 32},
    "variants": [
        {"name": "dense"},
        {"name": "int8", "steps": [{"quantize": {}}]},
        {
            "name": "structured",
            "steps": [
                {"encoder_prune": {"ffn_fraction": 0.5, "head_fraction": 0.5,
                                   "importance": "activation"}},
                {"distill": {"steps": 40, "learning_rate": 0.003, "loss": "cosine_mse",
                             "freeze": ["bert.embeddings"], "log_every": 10}},
            ],
        },
        {"name": "structured-int8", "from": "structured", "steps": [{"quantize": {}}]},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, VariantManifest]]:
    repository = tmp_path_factory.mktemp("tiny")
    lines: list[str] = []
    variants = build_family(parse_recipe(RECIPE), repository, progress=lines.append)
    assert any("distill step 40/40" in line for line in lines)
    return repository, {variant.name: variant.manifest for variant in variants}


def quality(manifest: VariantManifest) -> dict[str, float]:
    return {row.metric: row.value for row in manifest.quality}


def test_every_variant_records_embedding_quality_and_gzip_size(built: tuple) -> None:
    repository, manifests = built
    assert list(manifests) == ["tiny.dense", "tiny.int8", "tiny.structured", "tiny.structured-int8"]
    for name, manifest in manifests.items():
        assert manifest == VariantManifest.read(repository / name / MANIFEST_FILENAME)
        assert manifest.task is Task.embedding
        assert set(quality(manifest)) == {"cosine_mean", "cosine_min", "top1_agreement"}
        assert all(row.samples == 48 for row in manifest.quality)
        assert 0 < manifest.gzip_bytes < manifest.file_bytes
        assert manifest.recipe is not None and "measured" not in manifest.recipe
    dense = manifests["tiny.dense"]
    assert dense.baseline is None
    assert dense.quality[0].dataset.endswith("the ONNX export against torch")
    assert quality(dense)["cosine_min"] > 0.9999
    assert quality(manifests["tiny.int8"])["cosine_mean"] > 0.97
    assert manifests["tiny.int8"].quantization == "int8 dynamic per-channel"


def test_the_structured_variant_is_smaller_and_distillation_is_measured(built: tuple) -> None:
    _, manifests = built
    structured = manifests["tiny.structured"]
    layers = {layer.name: layer.shape for layer in structured.layers}
    assert layers["bert.encoder.layer.0.intermediate.dense.weight"] == [FFN // 2, HIDDEN]
    assert layers["bert.encoder.layer.1.attention.self.query.weight"] == [HIDDEN // 2, HIDDEN]
    assert structured.parameters < manifests["tiny.dense"].parameters
    assert structured.method == (
        "encoder prune 50% FFN neurons, 50% heads (activation importance)"
        " + distill 40 steps (cosine_mse)"
    )
    prune, distill = (step["report"] for step in structured.recipe["steps"])
    assert prune["layers"] == [{"layer": i, "ffn_neurons": 48, "heads": 2} for i in range(2)]
    assert prune["calibration_batches"] == 2
    before, after = distill["heldout_before"], distill["heldout_after"]
    # Distillation closes more than half of the gap that pruning opened.
    assert 1 - after["cosine_mean"] < 0.5 * (1 - before["cosine_mean"])
    assert distill["loss_window_steps"] == 20
    assert distill["loss_last"] < distill["loss_first"]
    # The step measured in torch on the test inputs what the manifest measured in ONNX.
    assert abs(after["cosine_mean"] - quality(structured)["cosine_mean"]) < 1e-4
    child = manifests["tiny.structured-int8"]
    assert [next(iter(step)) for step in child.recipe["steps"]] == [
        "encoder_prune",
        "distill",
        "quantize",
    ]
    assert quality(child)["cosine_mean"] > before["cosine_mean"]


def test_the_graph_takes_int64_inputs_of_any_batch_and_sequence(built: tuple) -> None:
    repository, _ = built
    path = repository / "tiny.structured-int8" / "1" / "model.onnx"
    graph = onnx.load(str(path)).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert list(inputs) == list(NAMES)
    for tensor in inputs.values():
        assert tensor.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor.shape.dim] == ["batch", "sequence"]
    (longer,) = token_batches(3, 3, seed=9)
    longer = {k: np.pad(v, ((0, 0), (0, 30 - v.shape[1]))) for k, v in longer.items()}
    embeddings = run_onnx(path, longer)
    assert embeddings.shape == (3, HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_distill_is_a_step_for_classifiers_too() -> None:
    split = load_digits_split(0)
    data = TrainingData(split.x_train, split.y_train, split.x_train[:64], x_heldout=split.x_test)
    torch.manual_seed(0)
    teacher, student = mlp().eval(), mlp()
    config = DistillConfig(steps=150, learning_rate=0.01, loss=DistillLoss.kl, batch_size=64)
    report = apply(student, config, data=data, input_name="pixels", teacher=teacher)
    before, after = report["heldout_before"], report["heldout_after"]
    assert after["top1_agreement"] > max(0.8, before["top1_agreement"] + 0.3)
    assert report["train_batches"] == -(-len(split.x_train) // 64)


def test_distill_without_a_teacher_or_with_a_wrong_freeze_says_what_it_needs() -> None:
    split = load_digits_split(0)
    data = TrainingData(split.x_train, split.y_train, split.x_train[:64])
    with pytest.raises(RecipeError, match="distill trains towards a teacher"):
        apply(mlp(), DistillConfig(steps=1), data=data, input_name="pixels")
    with pytest.raises(ValueError, match=r"no submodule 'bert.embeddings' \(its children: fc1"):
        apply(
            mlp(),
            DistillConfig(steps=1, freeze=("bert.embeddings",)),
            data=data,
            input_name="pixels",
            teacher=mlp(),
        )


def test_a_text_source_needs_an_architecture_with_a_tokenizer() -> None:
    with pytest.raises(RecipeError, match="'digits-mlp' has no tokenizer"):
        load_data(DataConfig(source="stdlib-docstrings"), architecture("digits-mlp"))
