"""The chart's server configuration, run for real: a sparseserve process started with
the config file (and traffic policy file) the chart renders answers the health checks
the chart's probes make, and exports the metric its autoscaler scales on. Only the
addresses change: loopback and free ports instead of the pod's."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from sparseserve.client.health_check import SERVING, HealthCheckError, check_health
from sparseserve.client.server_process import ServerProcess
from sparseserve.repository.manifest import VariantManifest
from sparseserve.testing import onnx_models
from tests.deploy.chart import (
    CHART,
    ROOT,
    component,
    render,
    server_container,
    values_of,
)
from tests.scrape import scrape
from tests.tls_certs import TestCA

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
    documents: list[dict[str, Any]],
    repository: Path,
    workdir: Path,
    secrets: dict[str, dict[str, bytes]] | None = None,
) -> ServerProcess:
    """`sparseserve serve` with the pod's arguments, config file and environment. The
    files of its ConfigMap and Secret volumes are written under `workdir` at their
    mount paths, and the paths in the arguments, the config file and the environment
    point there. `secrets`: the Secrets the chart expects to exist (name -> data)."""
    container = server_container(documents)
    args = pod_paths(list(container["args"]), documents, workdir, secrets or {})
    assert args[0] == "serve"
    env = {var["name"]: pod_path(var["value"], workdir) for var in container.get("env", [])}
    return ServerProcess(repository, *args[1:], env=env, startup_timeout=90).start()


def pod_path(text: str, workdir: Path) -> str:
    """`text` with the pod's mounted folders moved under `workdir`."""
    return text.replace("/etc/sparseserve", f"{workdir}/etc/sparseserve")


def pod_paths(
    command: list[str],
    documents: list[dict[str, Any]],
    workdir: Path,
    secrets: dict[str, dict[str, bytes]],
) -> list[str]:
    """Write the pod's mounted files under `workdir`; return `command` pointing there."""
    for path, content in mounted_files(documents, secrets).items():
        assert path.startswith("/etc/sparseserve"), path  # what pod_path moves
        local = Path(pod_path(path, workdir))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(pod_path(content.decode(), workdir).encode())
    return [pod_path(arg, workdir) for arg in command]


def mounted_files(
    documents: list[dict[str, Any]], secrets: dict[str, dict[str, bytes]]
) -> dict[str, bytes]:
    """Every file the server container sees from its ConfigMap and Secret volumes."""
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    rendered = {d["metadata"]["name"]: d for d in documents if d["kind"] in ("ConfigMap", "Secret")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in server_container(documents)["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = {k: v.encode() for k, v in rendered[volume["configMap"]["name"]]["data"].items()}
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            if name in rendered:
                data = {k: base64.b64decode(v) for k, v in rendered[name]["data"].items()}
            else:
                assert name in secrets, f"the chart expects a Secret {name!r}"
                data = secrets[name]
            items = volume["secret"].get("items")
            if items:
                data = {item["path"]: data[item["key"]] for item in items}
        else:
            continue
        for key, content in data.items():
            files[f"{mount['mountPath'].rstrip('/')}/{key}"] = content
    return files


def probe_passes(probe: dict[str, Any], server: ServerProcess, workdir: Path) -> bool:
    """Run the probe as the kubelet would: its gRPC health check, or its command in
    the container (with the address of this server, which listens on a free port)."""
    if "grpc" in probe:
        return check_health(server.grpc_url, probe["grpc"]["service"]) == SERVING
    command = [pod_path(arg, workdir) for arg in probe["exec"]["command"]]
    assert command[:2] == ["sparseserve", "health"]
    run = run_health(*command[2:], "--address", server.grpc_url)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode == 0


@pytest.fixture(params=SHIPPED, scope="module")
def served(
    request: pytest.FixtureRequest,
    family_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[dict[str, Any]], ServerProcess]]:
    values = values_of(CHART / request.param)
    documents = render(values, release="dense")
    workdir = tmp_path_factory.mktemp("pod")
    server = start_as_the_pod_would(documents, family_repository, workdir)
    try:
        yield documents, server, workdir
    finally:
        assert server.stop() == 0, server.log()
        server.close()


def test_every_probe_finds_the_server_serving(served) -> None:
    documents, server, workdir = served
    container = server_container(documents)
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe_passes(container[name], server, workdir), name


def test_health_check_tells_unknown_services_apart(served) -> None:
    """The probe check above can fail: a service the server does not report is refused."""
    _, server, _ = served
    with pytest.raises(HealthCheckError, match="no health status"):
        check_health(server.grpc_url, "inference.NoSuchService")


def test_autoscaling_metric_is_exported(served, family_repository: Path) -> None:
    _, server, _ = served
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
    documents, server, _ = served
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


def test_tls_and_restricted_values_serve_their_probes_and_clients(
    family_repository: Path, tmp_path: Path
) -> None:
    """Mutual TLS from a cert-manager-style Secret, the default model-repository
    restriction (its value generated by the chart) and a restricted health group: the
    probes, which run `sparseserve health` in the container, find the server serving,
    and a tritonclient with a client certificate needs the Secret's value to reach the
    repository RPCs."""
    values = {
        "tls": {"enabled": True, "secretName": "sparseserve-tls", "mutual": True},
        "restrictedProtocols": [
            {"groups": ["model-repository"], "key": "admin-key", "secretKey": "model-repository"},
            {
                "groups": ["health"],
                "key": "probe-key",
                "existingSecret": "probe-key",
                "secretKey": "value",
            },
        ],
    }
    documents = render(values, release="secure")
    ca = TestCA()
    server_name = component(documents, "Service", "server")["metadata"]["name"]
    issued = ca.server(dns_names=(server_name,), client=True)
    secrets = {
        "sparseserve-tls": {"tls.crt": issued.cert, "tls.key": issued.key, "ca.crt": ca.cert},
        "probe-key": {"value": b"pr0be\n"},
    }
    server = start_as_the_pod_would(documents, family_repository, tmp_path, secrets)
    try:
        container = server_container(documents)
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert "exec" in container[name], name
            assert probe_passes(container[name], server, tmp_path), name

        generated = next(d for d in documents if d["kind"] == "Secret")
        admin_value = base64.b64decode(generated["data"]["model-repository"]).decode()
        cert, key = ca.client().write(tmp_path / "client", "client")
        ca_file = ca.write(tmp_path / "client" / "ca.crt")
        with triton.InferenceServerClient(
            server.grpc_url,
            ssl=True,
            root_certificates=str(ca_file),
            private_key=str(key),
            certificate_chain=str(cert),
        ) as client:
            with pytest.raises(InferenceServerException, match="triton-grpc-protocol-admin-key"):
                client.get_model_repository_index()
            index = client.get_model_repository_index(
                headers={"triton-grpc-protocol-admin-key": admin_value}, as_json=True
            )
            assert {m["name"] for m in index["models"]} == {
                p.name for p in family_repository.iterdir()
            }
    finally:
        assert server.stop() == 0, server.log()
        server.close()
