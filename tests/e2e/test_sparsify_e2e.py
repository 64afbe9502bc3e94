"""Recipe -> `sparseserve sparsify` -> repository -> real server -> tritonclient: every
variant of a small recipe answers through the server with the accuracy its manifest
recorded, and `sparseserve inspect` reports it."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")

import tritonclient.grpc as triton

from sparseserve.cli import main
from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.sparsify.digits import load_digits_split

pytestmark = pytest.mark.integration

# The shipped recipes' variants, with a few epochs instead of many: the pipeline is the
# same, the build takes seconds.
MLP_RECIPE = """
version: 1
family: tiny-mlp
base:
  architecture: digits-mlp
  steps: [{train: {epochs: 8, lr: 0.003}}]
data: {source: sklearn-digits, seed: 0, calibration_samples: 64}
variants:
  - {name: dense}
  - name: pruned90
    steps:
      - gradual_prune: {final_sparsity: 0.9, epochs: 2, frequency_steps: 10}
      - train: {epochs: 2, lr: 0.001}
  - name: structured50
    steps: [{structured_prune: {sparsity: 0.5}}, {train: {epochs: 2}}, {shrink: {}}]
  - {name: int8, steps: [{quantize: {}}]}
  - {name: structured50-int8, from: structured50, steps: [{quantize: {mode: static}}]}
  - name: nm24
    steps: [{nm_prune: {n: 2, m: 4}}, {train: {epochs: 1}}]
"""
CNN_RECIPE = """
version: 1
family: tiny-cnn
base:
  architecture: digits-cnn
  steps: [{train: {epochs: 2, lr: 0.003}}]
data: {source: sklearn-digits, seed: 0, calibration_samples: 64}
variants:
  - {name: dense}
  - name: structured50
    steps: [{structured_prune: {sparsity: 0.5}}, {train: {epochs: 1}}, {shrink: {}}]
  - {name: structured50-int8, from: structured50, steps: [{quantize: {mode: static}}]}
  - {name: fp16, steps: [{quantize: {mode: fp16}}]}
"""
MODELS = [
    *(f"tiny-mlp.{v}" for v in ("dense", "pruned90", "structured50", "int8",
                                 "structured50-int8", "nm24")),
    *(f"tiny-cnn.{v}" for v in ("dense", "structured50", "structured50-int8", "fp16")),
]  # fmt: skip


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sparsified")
    (root / "m" / "tiny-mlp.dense" / "1").mkdir(parents=True)  # a model already there
    for name, text, count in (("mlp.yaml", MLP_RECIPE, 6), ("cnn.yaml", CNN_RECIPE, 4)):
        recipe = root.parent / f"{root.name}-{name}"
        recipe.write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["sparsify", "--recipe", str(recipe), "--repository", str(root / "m")]) == 0
        # The build ends with how long it took, the last line a person sees.
        last = out.getvalue().splitlines()[-1]
        assert re.fullmatch(
            rf"built {count} variants into {re.escape(str(root / 'm'))} in \d+ s", last
        ), last
        # A model it replaced is said to be replaced (it was, silently); only that one.
        replaced = [line for line in out.getvalue().splitlines() if "(replacing" in line]
        expected = ["tiny-mlp.dense"] if name == "mlp.yaml" else []
        assert [line.split()[1].rsplit("/", 1)[1] for line in replaced] == expected, replaced
    return root / "m"


@pytest.fixture(scope="module")
def client(repository: Path) -> Iterator[triton.InferenceServerClient]:
    with ServerProcess(repository) as server, triton.InferenceServerClient(server.grpc_url) as c:
        yield c
    assert server.returncode == 0, server.log()


def manifest(repository: Path, model: str) -> VariantManifest:
    return VariantManifest.read(repository / model / MANIFEST_FILENAME)


def served_logits(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    metadata = client.get_model_metadata(model)
    (spec,) = metadata.inputs
    x = x.reshape(len(x), *[int(d) for d in spec.shape[1:]])
    tensor = triton.InferInput(spec.name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy(metadata.outputs[0].name)


def test_sparsify_writes_every_variant(repository: Path) -> None:
    assert sorted(p.name for p in repository.iterdir()) == sorted(MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_each_variant_serves_the_accuracy_its_manifest_recorded(
    repository: Path, client: triton.InferenceServerClient, model: str
) -> None:
    split = load_digits_split(0)
    assert client.is_model_ready(model)
    logits = served_logits(client, model, split.x_test)
    assert logits.shape == (len(split.y_test), 10)
    accuracy = float((logits.argmax(axis=1) == split.y_test).mean())
    quality = {q.metric: q for q in manifest(repository, model).quality}
    assert accuracy == quality["accuracy"].value
    assert accuracy > 0.8
    if not model.endswith(".dense"):
        assert (
            quality["accuracy"].baseline_value
            == manifest(repository, model.rsplit(".", 1)[0] + ".dense").quality[0].value
        )


def test_the_manifests_say_what_each_variant_is(repository: Path) -> None:
    pruned = manifest(repository, "tiny-mlp.pruned90")
    assert pruned.sparsity == pytest.approx(0.9, abs=1e-3)
    assert pruned.baseline == "tiny-mlp.dense"
    assert pruned.file_bytes == (repository / "tiny-mlp.pruned90/1/model.onnx").stat().st_size
    assert pruned.file_bytes < manifest(repository, "tiny-mlp.dense").file_bytes / 2  # sparse
    assert pruned.gzip_bytes is not None and pruned.gzip_bytes < pruned.file_bytes
    assert {a.name for a in pruned.activation_sparsity} == {"relu1", "relu2"}

    structured = manifest(repository, "tiny-mlp.structured50")
    assert [layer.shape for layer in structured.layers] == [[64, 64], [32, 64], [10, 32]]
    assert structured.parameters < manifest(repository, "tiny-mlp.dense").parameters / 2

    assert manifest(repository, "tiny-mlp.int8").quantization == "int8 dynamic per-channel"
    both = manifest(repository, "tiny-mlp.structured50-int8")
    assert both.quantization == "int8 static QDQ per-channel"
    assert "structured 50%" in both.method and "shrink" in both.method

    nm = manifest(repository, "tiny-mlp.nm24")
    assert "2:4" in nm.method  # export-triton's cue for TensorRT sparse kernels
    assert all(layer.sparsity == 0.5 for layer in nm.layers)
    assert any("do not change CPU latency" in note for note in nm.notes)


def test_inspect_prints_layers_size_and_quality(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(repository / "tiny-mlp.pruned90")]) == 0
    out = capsys.readouterr().out
    assert "family tiny-mlp, variant pruned90, baseline tiny-mlp.dense" in out
    assert "fc1.weight" in out and "sparsity" in out
    assert "1/model.onnx" in out
    assert "accuracy: " in out and "(baseline " in out


def test_inspect_explains_a_parameter_count_the_export_changed(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """digits-cnn has two batch norms (96 parameters) that export folds into the
    convolutions: the manifest's count (torch's) and the file's differ, and inspect says
    why (it showed both without a word); the MLP's agree, and no note is printed."""
    assert main(["inspect", str(repository / "tiny-cnn.dense")]) == 0
    out = capsys.readouterr().out
    counted = manifest(repository, "tiny-cnn.dense").parameters
    assert counted is not None
    assert f"the manifest counts {counted:,} parameters, the file {counted - 96:,}" in out
    assert main(["inspect", str(repository / "tiny-mlp.dense")]) == 0
    assert "note: the manifest counts" not in capsys.readouterr().out


def test_inspect_of_a_directory_without_a_model_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert "holds neither <version>/*.onnx files nor a sparseserve.yaml" in capsys.readouterr().err


def test_sparsify_refuses_a_bad_recipe_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(MLP_RECIPE)
    data["variants"][1]["steps"][0]["gradual_prune"]["final_sparsity"] = 1.5
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(data))
    assert main(["sparsify", "--recipe", str(recipe), "--repository", str(tmp_path / "m")]) == 2
    assert "gradual_prune.final_sparsity: Input should be less than 1" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
