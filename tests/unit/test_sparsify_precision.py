"""The `precision: bf16` step: the file stays fp32, the manifest records bf16 and the
quality is OpenVINO's at bf16, measured only on a CPU that computes bf16. On a CPU that
does not (this project's AVX2-only build machine, among others), a required bf16 variant
stops the build before anything is trained, with a message saying why and what to do;
an optional one is skipped with a warning and leaves no model or manifest behind; and a
measurement that OpenVINO silently compiled at f32 is never recorded as bf16."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch", reason="needs the [sparsify] extra")
pytest.importorskip("openvino", reason="needs the [sparsify] extra")

import openvino

from sparseserve.repository.manifest import MANIFEST_FILENAME, VariantManifest
from sparseserve.sparsify import pipeline, precision
from sparseserve.sparsify.digits import load_digits_split
from sparseserve.sparsify.export import run_onnx
from sparseserve.sparsify.pipeline import FamilyBuilder, build_family
from sparseserve.sparsify.precision import PrecisionUnavailable, bf16_unavailable, run_openvino
from sparseserve.sparsify.recipe import parse_recipe
from sparseserve.testing import onnx_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU does not compute bf16")
lacks_bf16 = pytest.mark.skipif(HAS_BF16, reason="this CPU computes bf16")


def recipe(*variants: dict) -> dict:
    return {
        "family": "t",
        "base": {"architecture": "digits-mlp", "steps": [{"train": {"epochs": 2}}]},
        "data": {"source": "sklearn-digits", "calibration_samples": 32},
        "variants": [{"name": "dense"}, *variants],
    }


BF16 = {"name": "bf16", "steps": [{"precision": "bf16"}]}
OPTIONAL_BF16 = {"name": "bf16", "steps": [{"precision": {"dtype": "bf16", "optional": True}}]}
PRUNED = {"name": "pruned", "steps": [{"magnitude_prune": {"sparsity": 0.5}}]}


def test_the_capability_check_agrees_with_openvino() -> None:
    reason = bf16_unavailable()
    assert (reason is None) == HAS_BF16
    if reason is not None:
        assert "does not compute bf16" in reason
        assert "AVX512_BF16 or AMX" in reason


@lacks_bf16
def test_a_required_bf16_variant_stops_the_build_before_training(tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(PrecisionUnavailable) as caught:
        build_family(parse_recipe(recipe(PRUNED, BF16)), tmp_path, progress=lines.append)
    message = str(caught.value)
    assert message.startswith("t.bf16: cannot build a bf16 variant here: this CPU (")
    assert "does not compute bf16" in message
    assert "optional: true" in message  # what to do about it
    assert not any("ready in" in line for line in lines)  # nothing was trained
    assert list(tmp_path.iterdir()) == []  # nothing was written


@lacks_bf16
def test_an_optional_bf16_variant_is_skipped_with_a_warning_and_no_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="sparseserve.sparsify.pipeline"):
        built = build_family(
            parse_recipe(recipe(OPTIONAL_BF16, PRUNED)), tmp_path, progress=lines.append
        )
    assert [variant.name for variant in built] == ["t.dense", "t.pruned"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.dense", "t.pruned"]
    assert any(line.startswith("[t.bf16] WARNING: skipped") for line in lines)
    assert any("t.bf16: skipped" in record.getMessage() for record in caplog.records)


@lacks_bf16
def test_openvino_compiling_f32_when_asked_for_bf16_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back guards the measurement even if the capability check were wrong:
    told that this CPU has bf16, the build still refuses to record OpenVINO's f32."""
    monkeypatch.setattr(pipeline, "bf16_unavailable", lambda: None)
    monkeypatch.setattr(precision, "bf16_unavailable", lambda: None)
    with pytest.raises(PrecisionUnavailable, match="compiled the model at f32 when asked for bf16"):
        build_family(parse_recipe(recipe(BF16)), tmp_path, progress=lambda line: None)
    assert list(tmp_path.iterdir()) == []
    model = onnx_models.mlp(tmp_path / "mlp.onnx").read_bytes()
    feed = {"input": np.ones((2, 64), np.float32)}
    with pytest.raises(PrecisionUnavailable, match="at f32 when asked for bf16"):
        run_openvino(model, [feed], "bf16")


def test_openvino_at_fp32_gives_onnxruntimes_answers(tmp_path: Path) -> None:
    model = onnx_models.mlp(tmp_path / "mlp.onnx").read_bytes()
    feeds = [{"input": np.random.default_rng(seed).random((4, 64), np.float32)} for seed in (0, 1)]
    np.testing.assert_allclose(run_openvino(model, feeds), run_onnx(model, feeds), rtol=1e-5)


@needs_bf16
def test_a_bf16_variant_is_measured_on_openvino_at_bf16(tmp_path: Path) -> None:
    builder = FamilyBuilder(parse_recipe(recipe(BF16)), progress=lambda line: None).build()
    built = {variant.name: variant for variant in builder.write(tmp_path)}
    manifest = VariantManifest.read(tmp_path / "t.bf16" / MANIFEST_FILENAME)
    assert manifest == built["t.bf16"].manifest
    assert manifest.precision == "bf16"
    assert built["t.dense"].manifest.precision == "fp32"
    assert manifest.method == "bf16 (OpenVINO)"
    assert any("runs at bf16 on OpenVINO" in note for note in manifest.notes)
    # The same file as dense, fp32 on disk; the outputs measured are bf16's, not fp32's.
    dense_file = (tmp_path / "t.dense" / "1" / "model.onnx").read_bytes()
    assert (tmp_path / "t.bf16" / "1" / "model.onnx").read_bytes() == dense_file
    variant = builder.variants["bf16"]
    assert not np.array_equal(variant.outputs, builder.variants["dense"].outputs)
    split = load_digits_split(0)
    accuracy = float((variant.outputs.argmax(axis=1) == split.y_test).mean())
    assert {q.metric: q.value for q in manifest.quality}["accuracy"] == accuracy
    assert {q.metric: q.value for q in manifest.quality}["top1_agreement"] > 0.95


@lacks_bf16
def test_sparsify_says_why_and_exits_1_on_a_cpu_without_bf16(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparseserve.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(BF16)))
    assert main(["sparsify", "--recipe", str(path), "--repository", str(tmp_path / "m")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("sparseserve: error: t.bf16: cannot build a bf16 variant here")
    assert "--debug" not in error  # a user's problem, not a bug to report
    assert not (tmp_path / "m").exists()
