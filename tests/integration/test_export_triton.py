"""`sparseserve export-triton`: every config it writes parses as Triton's own
`ModelConfig` (tritonclient's generated `model_config_pb2`), and sparseserve still
serves the repository afterwards, reporting the file's settings in ModelConfig."""

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


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    root = build_repository(tmp_path / "repository")
    variant(root, "mlp.int8", method="magnitude", quantization="int8-dynamic")
    variant(root, "mlp.sparse24", method="2:4 semi-structured")
    variant(root, "mlp.pruned90", method="magnitude", sparsity=0.9)
    assert main(["export-triton", "--repository", str(root), "--gpu-instances", "2"]) == 1
    return root  # 1: the broken models of the test repository are reported as failed


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
    # Written by hand before the export, so kept as it was.
    versioned = triton_config(exported / "versioned" / "config.pbtxt")
    assert versioned.HasField("version_policy") and not versioned.input


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


def test_force_rewrites_but_keeps_the_version_policy(exported: Path) -> None:
    assert main(["export-triton", "--repository", str(exported), "--force"]) == 1
    versioned = triton_config(exported / "versioned" / "config.pbtxt")
    assert versioned.version_policy.WhichOneof("policy_choice") == "all"
    assert versioned.input and versioned.instance_group


def test_sparseserve_serves_the_exported_repository(
    exported: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(exported, "--load-model", "mlp", "--load-model", "mlp.int8")
    with triton.InferenceServerClient(server.grpc_url) as client:
        config = client.get_model_config("mlp.int8").config
        assert config.max_batch_size == 64 and config.HasField("dynamic_batching")
        gpu = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert gpu[0].parameters["precision_mode"] == "INT8"
        pixels = np.zeros((3, 64), dtype=np.float32)
        tensor = triton.InferInput("input", [3, 64], "FP32")
        tensor.set_data_from_numpy(pixels)
        assert client.infer("mlp", [tensor]).as_numpy("output").shape == (3, 10)


@pytest.mark.slow
def test_demo_variants_export_to_valid_triton_configs(
    tmp_path: Path, demo_repository: Path
) -> None:
    """The demo repository (trained with torch), exported: every file parses."""
    shutil.copytree(demo_repository, tmp_path, dirs_exist_ok=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export-triton", "--repository", str(tmp_path)]) == 0
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
