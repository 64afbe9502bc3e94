"""The chart's server configuration, run for real: a sparseserve process started with
the config file (and traffic policy file) the chart renders answers the health checks
the chart's probes make, and exports the metric its autoscaler scales on. Only the
addresses change: loopback and free ports instead of the pod's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparseserve.repository.manifest import VariantManifest
from sparseserve.server.health_check import SERVING, HealthCheckError, check_health
from sparseserve.server.process import ServerProcess
from sparseserve.testing import onnx_models
from tests.deploy.chart import (
    CHART,
    ROOT,
    mounted_file,
    render,
    server_container,
    values_of,
)
from tests.scrape import scrape

pytestmark = pytest.mark.integration

SHIPPED = ["values.yaml", "values-dense.yaml", "values-sparse.yaml", "values-gpu.yaml"]
ADAPTER = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"


@pytest.fixture(scope="module")
def family_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits-mlp family the shipped values files name: a dense and a sparse variant."""
    root = tmp_path_factory.mktemp("models")
    for variant in ("dense", "pruned90"):
        name = f"digits-mlp.{variant}"
        onnx_models.mlp(root / name / "1" / "model.onnx")
        baseline = None if variant == "dense" else "digits-mlp.dense"
        VariantManifest(family="digits-mlp", variant=variant, baseline=baseline).write(
            root / name / "sparseserve.yaml"
        )
    return root


def start_as_the_pod_would(
    documents: list[dict[str, Any]], repository: Path, workdir: Path
) -> ServerProcess:
    """`sparseserve serve` with the pod's arguments, config file and environment; the
    ConfigMap's files written to `workdir` stand in for the mounted ones."""
    container = server_container(documents)
    args = list(container["args"])
    assert args[0] == "serve"
    config_path = args[args.index("--config") + 1]
    config = workdir / "config.yaml"
    config.write_text(mounted_file(documents, config_path), encoding="utf-8")
    args[args.index("--config") + 1] = str(config)
    env = {}
    for var in container.get("env", []):
        local = workdir / Path(var["value"]).name
        local.write_text(mounted_file(documents, var["value"]), encoding="utf-8")
        env[var["name"]] = str(local)
    return ServerProcess(repository, *args[1:], env=env, startup_timeout=90).start()


@pytest.fixture(params=SHIPPED, scope="module")
def served(
    request: pytest.FixtureRequest,
    family_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[dict[str, Any]], ServerProcess]]:
    values = values_of(CHART / request.param)
    documents = render(values, release="dense")
    server = start_as_the_pod_would(documents, family_repository, tmp_path_factory.mktemp("pod"))
    try:
        yield documents, server
    finally:
        assert server.stop() == 0, server.log()
        server.close()


def test_every_probe_finds_the_server_serving(served) -> None:
    documents, server = served
    container = server_container(documents)
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        service = container[name]["grpc"]["service"]
        assert check_health(server.grpc_url, service) == SERVING, name


def test_health_check_tells_unknown_services_apart(served) -> None:
    """The probe check above can fail: a service the server does not report is refused."""
    _, server = served
    with pytest.raises(HealthCheckError, match="no health status"):
        check_health(server.grpc_url, "inference.NoSuchService")


def test_autoscaling_metric_is_exported(served, family_repository: Path) -> None:
    _, server = served
    samples = scrape(server)
    hpa_values = values_of(CHART / "values-gpu.yaml")
    (hpa,) = (d for d in render(hpa_values) if d["kind"] == "HorizontalPodAutoscaler")
    (pods_metric,) = (m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    name = pods_metric["pods"]["metric"]["name"]
    adapter = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")
    loaded = {s.labels["model"] for s in samples if s.name == name}
    assert loaded, f"{name} is not exported:\n" + "\n".join(sorted({s.name for s in samples}))
    assert loaded <= {p.name for p in family_repository.iterdir()}


def test_gpu_values_serve_while_triton_is_unreachable(family_repository: Path, tmp_path: Path):
    """values-gpu.yaml sends models to Triton; with no Triton (as while its GPU pod
    starts) the pod still becomes ready and answers from onnxruntime."""
    documents = render(values_of(CHART / "values-gpu.yaml"), release="gpu")
    server = start_as_the_pod_would(documents, family_repository, tmp_path)
    try:
        readiness = server_container(documents)["readinessProbe"]["grpc"]["service"]
        assert check_health(server.grpc_url, readiness) == SERVING
        samples = scrape(server)
        ready = {s.labels["model"] for s in samples if s.name == "sparseserve_model_ready"}
        assert ready == {"digits-mlp.dense", "digits-mlp.pruned90"}
    finally:
        assert server.stop() == 0, server.log()
        server.close()


def run_health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sparseserve", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_health_command_as_the_image_runs_it(served) -> None:
    """The Dockerfile's and compose's HEALTHCHECK: `sparseserve health` finds the port
    in the SPARSESERVE_* environment the container was started with."""
    documents, server = served
    env = {**os.environ, "SPARSESERVE_GRPC_PORT": str(server.grpc_port)}
    result = run_health(env=env)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout
    readiness = server_container(documents)["readinessProbe"]["grpc"]["service"]
    assert run_health("--address", server.grpc_url, "--service", readiness).returncode == 0


def test_health_command_fails_without_a_server(tmp_path: Path) -> None:
    result = run_health("--address", "127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1
    assert "cannot ask 127.0.0.1:1 for its health: UNAVAILABLE" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc_port: eighty\n")
    result = run_health("--config", str(bad))
    assert result.returncode == 2 and "invalid configuration" in result.stderr
