"""Shared fixtures: a model repository of synthetic ONNX models, and real sparseserve
server processes on free ports, called with tritonclient."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton

from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import Quality, Task, VariantManifest
from sparseserve.testing import onnx_models

GOOD_MODELS = ("mlp", "multi_io", "identity", "versioned", "latest", "slow")
BROKEN_MODELS = ("corrupt", "truncated", "bad_manifest")

VERSIONS_ALL = """
name: "versioned"
platform: "onnxruntime_onnx"
version_policy: { all { } }
# A field Triton knows and sparseserve does not model: must not stop the model loading.
model_warmup: [ { name: "w" batch_size: 1 } ]
"""


def build_repository(root: Path) -> Path:
    """The test repository: models that work, and models broken in different ways."""
    onnx_models.mlp(root / "mlp" / "1" / "model.onnx")
    VariantManifest(
        family="mlp",
        variant="dense",
        task=Task.classification,
        quality=[Quality(metric="accuracy", value=0.5, dataset="none", samples=0)],
    ).write(root / "mlp" / "sparseserve.yaml")
    onnx_models.multi_io(root / "multi_io" / "1" / "model.onnx")
    onnx_models.identity_all_types(root / "identity" / "1" / "model.onnx")
    for version in (1, 2, 3):
        # y = x + version: the answer says which version served it.
        onnx_models.add_constant(root / "versioned" / str(version) / "model.onnx", version)
        onnx_models.add_constant(root / "latest" / str(version) / "model.onnx", version)
    (root / "versioned" / "config.pbtxt").write_text(VERSIONS_ALL)
    onnx_models.slow(root / "slow" / "1" / "model.onnx", width=512, depth=32)

    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an onnx model\x00\xff" * 8)
    good = (root / "mlp" / "1" / "model.onnx").read_bytes()
    (root / "truncated" / "1").mkdir(parents=True)
    (root / "truncated" / "1" / "model.onnx").write_bytes(good[: len(good) // 2])
    shutil.copytree(root / "mlp", root / "bad_manifest")
    (root / "bad_manifest" / "sparseserve.yaml").write_text("family: x\nsparsity: 1.5\n")
    return root


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository (both digits recipes, trained with torch), built once per
    session; tests that change it must work on a copy."""
    pytest.importorskip("torch", reason="needs the [sparsify] extra")
    from sparseserve.sparsify.demo_models import build_demo_repository

    path = tmp_path_factory.mktemp("demo-models")
    build_demo_repository(path, seed=0, progress=lambda line: None)
    return path


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[ServerProcess]:
    """One server for the whole session, for tests that do not change its state."""
    with ServerProcess(repository) as process:
        yield process
    assert process.returncode == 0, process.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.grpc_url) as c:
        yield c


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a dedicated server: `start_server(repository, *serve_args)`; each is stopped
    at teardown and must exit 0."""
    started: list[ServerProcess] = []

    def start(repository: Path, *args: str, **kwargs: object) -> ServerProcess:
        process = ServerProcess(repository, *args, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process.start()

    yield start
    for process in started:
        code = process.stop()
        process.close()
        assert code == 0, f"server exited with {code}:\n{process.log()}"
