"""`sparseserve export-triton`: it writes a separate Triton repository and leaves the
source as it was (unless --in-place); every config it writes parses as Triton's own
`ModelConfig` (tritonclient's generated `model_config_pb2`), and sparseserve serves
the export too, reporting the file's settings in ModelConfig."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as upstream

from sparseserve.cli import main
from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import VariantManifest
from tests.conftest import GOOD_MODELS, build_repository

pytestmark = pytest.mark.integration


def triton_config(path: Path) -> upstream.ModelConfig:
    """Parse strictly (no unknown fields) into tritonclient's ModelConfig."""
    return text_format.Parse(path.read_text(), upstream.ModelConfig())


def variant(root: Path, name: str, **manifest: object) -> None:
    shutil.copytree(root / "mlp", root / name)
    VariantManifest(family="mlp", variant=name, baseline="mlp", **manifest).write(  # type: ignore[arg-type]
        root / name / "sparseserve.yaml"
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = build_repository(tmp_path / "repository")
    variant(root, "mlp.int8", method="magnitude", quantization="int8-dynamic")
    variant(root, "mlp.sparse24", method="2:4 semi-structured")
    variant(root, "mlp.pruned90", method="magnitude", sparsity=0.9)
    return root


@pytest.fixture
def exported(source: Path) -> Path:
    """The default export: a separate Triton repository beside the source."""
    assert main(["export-triton", "--repository", str(source), "--gpu-instances", "2"]) == 1
    return source.parent / "repository-triton"  # 1: the broken models are reported failed


def test_every_config_parses_as_tritons_model_config(exported: Path) -> None:
    written = [m for m in GOOD_MODELS if m != "versioned"]  # it had a config already
    for name in (*written, "mlp.int8", "mlp.sparse24", "mlp.pruned90"):
        config = triton_config(exported / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert [(g.kind, g.count) for g in config.instance_group] == [
            (upstream.ModelInstanceGroup.KIND_GPU, 2)
        ]
    mlp = triton_config(exported / "mlp" / "config.pbtxt")
    assert mlp.max_batch_size == 64 and mlp.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in mlp.input] == [
        ("input", upstream.TYPE_FP32, [64])
    ]
    # Written by hand before the export, so copied as it was.
    versioned = triton_config(exported / "versioned" / "config.pbtxt")
    assert versioned.HasField("version_policy") and not versioned.input


def test_the_export_leaves_the_source_repository_unchanged(tmp_path: Path, source: Path) -> None:
    """The bug: export-triton wrote max_batch_size, dynamic_batching and KIND_GPU into
    the repository sparseserve serves, silently turning on batching there."""
    before = snapshot(source)
    assert main(["export-triton", "--repository", str(source)]) == 1
    assert snapshot(source) == before
    exported = tmp_path / "repository-triton"
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [*GOOD_MODELS, "mlp.int8", "mlp.sparse24", "mlp.pruned90"]
    )  # the broken models are left out
    # Model files are hard links (same filesystem here), not second copies.
    for relative in ("mlp/1/model.onnx", "latest/3/model.onnx", "mlp/sparseserve.yaml"):
        assert (exported / relative).stat().st_ino == (source / relative).stat().st_ino


def test_a_second_export_follows_the_source(source: Path, exported: Path) -> None:
    shutil.rmtree(source / "latest" / "3")
    (source / "mlp" / "config.pbtxt").write_text('name: "mlp"\nplatform: "onnxruntime_onnx"\n')
    assert main(["export-triton", "--repository", str(source), "--output", str(exported)]) == 1
    assert sorted(p.name for p in (exported / "latest").iterdir()) == ["1", "2", "config.pbtxt"]
    assert not triton_config(exported / "mlp" / "config.pbtxt").input  # the user's, copied


def test_in_place_writes_the_configs_into_the_repository(source: Path) -> None:
    assert main(["export-triton", "--repository", str(source), "--in-place"]) == 1
    assert triton_config(source / "mlp" / "config.pbtxt").HasField("dynamic_batching")
    assert not (source.parent / "repository-triton").exists()


def test_an_output_inside_the_repository_is_refused(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = source / "triton"
    assert main(["export-triton", "--repository", str(source), "--output", str(inside)]) == 1
    assert "is inside the repository" in capsys.readouterr().err
    assert not inside.exists()


def test_tensorrt_only_for_int8_and_2_4_variants(exported: Path) -> None:
    def accelerators(name: str) -> list[dict[str, str]]:
        config = triton_config(exported / name / "config.pbtxt")
        return [
            {"name": a.name, **a.parameters}
            for a in config.optimization.execution_accelerators.gpu_execution_accelerator
        ]

    assert accelerators("mlp.int8")[0]["precision_mode"] == "INT8"
    assert accelerators("mlp.sparse24")[0]["trt_sparsity_enable"] == "1"
    assert accelerators("mlp.pruned90") == []  # unstructured: no faster on a GPU
    assert accelerators("mlp") == []


def test_force_rewrites_but_keeps_the_version_policy(source: Path, exported: Path) -> None:
    assert main(["export-triton", "--repository", str(source), "--force"]) == 1
    versioned = triton_config(exported / "versioned" / "config.pbtxt")
    assert versioned.version_policy.WhichOneof("policy_choice") == "all"
    assert versioned.input and versioned.instance_group
    assert triton_config(source / "versioned" / "config.pbtxt").input == []  # source as it was


def test_sparseserve_serves_both_and_batches_only_the_export(
    source: Path, exported: Path, start_server: Callable[..., ServerProcess]
) -> None:
    pixels = np.zeros((3, 64), dtype=np.float32)
    tensor = triton.InferInput("input", [3, 64], "FP32")
    tensor.set_data_from_numpy(pixels)
    server = start_server(exported, "--load-model", "mlp", "--load-model", "mlp.int8")
    with triton.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config("mlp.int8").config
        assert config.max_batch_size == 64 and config.HasField("dynamic_batching")
        gpu = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert gpu[0].parameters["precision_mode"] == "INT8"
        assert client.infer("mlp", [tensor]).as_numpy("output").shape == (3, 10)
    server = start_server(source, "--load-model", "mlp")
    with triton.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config("mlp").config
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert client.infer("mlp", [tensor]).as_numpy("output").shape == (3, 10)


@pytest.mark.slow
def test_demo_variants_export_to_valid_triton_configs(
    tmp_path: Path, demo_repository: Path
) -> None:
    """The demo repository (trained with torch), exported: every file parses."""
    names = sorted(p.name for p in demo_repository.iterdir())
    assert (
        main(["export-triton", "--repository", str(demo_repository), "--output", str(tmp_path)])
        == 0
    )
    for name in names:
        config = triton_config(tmp_path / name / "config.pbtxt")
        assert config.name == name and config.max_batch_size == 64
        assert config.input and config.output

    def accelerator(name: str) -> dict[str, str]:
        config = triton_config(tmp_path / name / "config.pbtxt")
        (gpu,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        return dict(gpu.parameters)

    # What sparsify wrote in the manifests is what picks TensorRT's int8 and 2:4 kernels.
    assert accelerator("digits-cnn.int8")["precision_mode"] == "INT8"
    assert accelerator("digits-mlp.structured50-int8")["precision_mode"] == "INT8"
    assert accelerator("digits-mlp.nm24")["trt_sparsity_enable"] == "1"


def test_what_triton_would_compute_otherwise_is_skipped_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bf16 variant (Triton's onnxruntime has no bf16 mode) and an OpenVINO IR (Triton
    runs it on its CPU) are left out, each with why; the command still succeeds. Each
    TensorRT line says the precision, FP16 being one the variant was not measured in."""
    import openvino

    from sparseserve.testing import onnx_models

    root = tmp_path / "repository"
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    variant(root, "mlp.bf16", precision="bf16")
    variant(root, "mlp.int8", method="magnitude", quantization="int8-dynamic")
    variant(root, "mlp.sparse24", method="2:4 semi-structured")
    (root / "ir" / "1").mkdir(parents=True)
    openvino.save_model(
        openvino.convert_model(str(root / "mlp" / "1" / "model.onnx")),
        str(root / "ir" / "1" / "model.xml"),
        compress_to_fp16=False,
    )
    output = tmp_path / "triton"
    assert main(["export-triton", "--repository", str(root), "--output", str(output)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["mlp.bf16"].startswith("skipped (it is a bf16 variant, and Triton's "
                                        "onnxruntime backend would compute it in fp32")  # fmt: skip
    assert lines["ir"].startswith("skipped (it is an OpenVINO model (model.xml)")
    assert "sparseserve serves it on the CPU" in lines["ir"]
    assert lines["mlp.int8"].endswith("(TensorRT INT8)")
    assert lines["mlp.sparse24"].endswith(
        "(TensorRT FP16: computes in fp16, not the fp32 the variant was measured in)"
    )
    assert lines["mlp"].endswith("config.pbtxt")  # no accelerator, nothing to say
    assert sorted(p.name for p in output.iterdir()) == ["mlp", "mlp.int8", "mlp.sparse24"]
