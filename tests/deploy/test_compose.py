"""deploy/docker-compose.yml, resolved by Docker Compose itself and checked against the
server's settings, the Dockerfile and the monitoring files it mounts."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from sparseserve.settings import Settings
from tests.deploy.chart import ROOT
from tests.deploy.compose import COMPOSE_FILE, compose_config

DEPLOY = COMPOSE_FILE.parent
# The monitoring files and where the stack expects them.
MONITORING_FILES = {
    relative: (service, inside + relative.removeprefix(local))
    for service, local, inside in (
        ("prometheus", "prometheus/", "/etc/prometheus/"),
        ("grafana", "grafana/provisioning/", "/etc/grafana/provisioning/"),
        ("grafana", "grafana/dashboards/", "/var/lib/grafana/dashboards/"),
    )
    for relative in (
        "prometheus/prometheus.yml",
        "prometheus/rules/sparseserve.rules.yml",
        "prometheus/rules/sparseserve.alerts.yml",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/sparseserve.yml",
        "grafana/dashboards/sparseserve.json",
    )
    if relative.startswith(local)
}


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return compose_config()


@pytest.fixture(scope="module")
def gpu_stack() -> dict[str, Any]:
    return compose_config("gpu", SPARSESERVE_DISPATCH="triton")


def server_settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the container's environment gives `sparseserve serve`."""
    for name, value in service["environment"].items():
        if name.startswith("SPARSESERVE_"):
            monkeypatch.setenv(name, value)
    return Settings.load()


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_services(stack, gpu_stack) -> None:
    assert set(stack["services"]) == {"sparseserve", "prometheus", "grafana"}
    assert set(gpu_stack["services"]) == {"sparseserve", "prometheus", "grafana", "triton"}


def test_environment_names_are_settings(stack) -> None:
    """Unknown SPARSESERVE_* variables are silently ignored by the settings loader."""
    for name in stack["services"]["sparseserve"]["environment"]:
        path = name.removeprefix("SPARSESERVE_").lower().split("__")
        model: Any = Settings
        for part in path:
            assert part in model.model_fields, f"{name}: no setting {part!r}"
            model = model.model_fields[part].annotation


def test_ports_healthcheck_and_drain(stack, monkeypatch: pytest.MonkeyPatch) -> None:
    service = stack["services"]["sparseserve"]
    settings = server_settings(service, monkeypatch)
    published = {int(p["target"]) for p in service["ports"]}
    assert published == {settings.grpc_port, settings.http_port, settings.metrics_port}
    assert settings.repository == Path("/models")
    assert {v["target"] for v in service["volumes"]} == {str(settings.repository)}
    assert all(v["read_only"] for v in service["volumes"])
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_of_the_image()]
    assert seconds(service["stop_grace_period"]) > settings.shutdown_grace_seconds
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["build"]["target"] == "serve"
    assert Path(service["build"]["context"]) == ROOT
    assert Path(service["build"]["dockerfile"]) == Path("deploy/Dockerfile")


def test_every_published_port_is_on_loopback(stack, gpu_stack) -> None:
    """The stack is for one machine: nothing is published beyond it, Prometheus's
    lifecycle API (one POST /-/quit stops it) and anonymous Grafana included."""
    for name, service in {**stack["services"], **gpu_stack["services"]}.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def healthcheck_of_the_image() -> list[str]:
    (check,) = (
        c for c in dockerfile.parse_file(str(DEPLOY / "Dockerfile")) if c.cmd == "HEALTHCHECK"
    )
    assert check.value[0] == "CMD"
    return list(check.value[1:])


def test_deployment_label_comes_from_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for variables, expected in (({}, "compose"), ({"DEPLOYMENT": "sparse"}, "sparse")):
        stack = compose_config(**variables)
        settings = server_settings(stack["services"]["sparseserve"], monkeypatch)
        (group,) = json.loads(stack["configs"]["sparseserve-targets"]["content"])
        assert group == {
            "targets": [f"sparseserve:{settings.metrics_port}"],
            "labels": {"deployment": expected},
        }
        mounts = stack["services"]["prometheus"]["configs"]
        assert [m["source"] for m in mounts] == ["sparseserve-targets"]


def test_monitoring_mounts_as_agreed(stack) -> None:
    def binds(name: str) -> dict[str, str]:
        return {
            v["target"]: v["source"]
            for v in stack["services"][name]["volumes"]
            if v["type"] == "bind"
        }

    assert binds("prometheus") == {"/etc/prometheus": str(DEPLOY / "prometheus")}
    assert binds("grafana") == {
        "/etc/grafana/provisioning": str(DEPLOY / "grafana" / "provisioning"),
        "/var/lib/grafana/dashboards": str(DEPLOY / "grafana" / "dashboards"),
    }
    assert (
        "--config.file=/etc/prometheus/prometheus.yml" in stack["services"]["prometheus"]["command"]
    )


@pytest.mark.parametrize("relative", sorted(MONITORING_FILES))
def test_mounted_monitoring_file_exists(stack, relative: str) -> None:
    service, inside = MONITORING_FILES[relative]
    mapped = [
        v["target"] + "/" + str((DEPLOY / relative).relative_to(v["source"]))
        for v in stack["services"][service]["volumes"]
        if v["type"] == "bind" and (DEPLOY / relative).is_relative_to(v["source"])
    ]
    assert mapped == [inside]
    assert (DEPLOY / relative).stat().st_size > 0


def test_prometheus_scrapes_the_server(stack, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    settings = server_settings(stack["services"]["sparseserve"], monkeypatch)
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "sparseserve")
    targets = [t for group in job.get("static_configs", []) for t in group["targets"]]
    # Or the targets file compose writes (with the $DEPLOYMENT label), by file_sd.
    target_file = stack["services"]["prometheus"]["configs"][0]["target"]
    sd_files = [pattern for sd in job.get("file_sd_configs", []) for pattern in sd["files"]]
    if any(fnmatch.fnmatch(target_file, pattern) for pattern in sd_files):
        content = json.loads(stack["configs"]["sparseserve-targets"]["content"])
        targets += [t for group in content for t in group["targets"]]
    assert f"sparseserve:{settings.metrics_port}" in targets
    assert config["rule_files"]
    for pattern in config["rule_files"]:
        # Prometheus reads a relative path from the config file's directory.
        inside = Path("/etc/prometheus") / pattern
        local = DEPLOY / "prometheus" / inside.relative_to("/etc/prometheus")
        assert list(local.parent.glob(local.name)), f"rule file {pattern} matches nothing"


def test_grafana_reads_this_prometheus(stack) -> None:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    (source,) = yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]
    port = {int(p["target"]) for p in stack["services"]["prometheus"]["ports"]}
    assert source["url"] in {f"http://prometheus:{p}" for p in port}


def test_gpu_profile_runs_triton_on_the_same_repository(gpu_stack, monkeypatch) -> None:
    services = gpu_stack["services"]
    settings = server_settings(services["sparseserve"], monkeypatch)
    assert settings.dispatch.value == "triton" and settings.dispatch_fallback
    assert settings.triton.url is not None
    host, port = settings.triton.url.split(":")
    assert host == "triton" and port == "8001"  # Triton's gRPC port
    triton = services["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    source = lambda s: [(v["source"], v["target"]) for v in s["volumes"]]  # noqa: E731
    assert source(triton) == source(services["sparseserve"])
    assert f"--model-repository={settings.repository}" in triton["command"]
    assert services["sparseserve"]["depends_on"]["triton"]["required"] is False


def test_cpu_stack_keeps_models_on_the_cpu(stack, monkeypatch) -> None:
    """Without the gpu profile, dispatch stays auto, which picks onnxruntime wherever the
    container sees no GPU."""
    assert server_settings(stack["services"]["sparseserve"], monkeypatch).dispatch.value == "auto"
