"""The Helm chart as the tests see it: rendered offline by Helm's own Go library
(helm-python-sdk binds it; no helm binary, no cluster), then parsed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sparseserve"
# Every values file the chart ships: the defaults and one per deployment kind.
VALUES_FILES = sorted(CHART.glob("values*.yaml"))
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the
# validator knows.
KUBE_VERSIONS = ("1.27.0", "1.37.0")


def values_of(path: Path) -> dict[str, Any]:
    """The user values a values file supplies (values.yaml is the chart's defaults,
    which Helm applies anyway)."""
    if path.name == "values.yaml":
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def render(
    values: dict[str, Any] | None = None,
    release: str = "test",
    namespace: str = "ml",
    chart: Path = CHART,
) -> list[dict[str, Any]]:
    """The chart's objects for `values`, as `helm install --dry-run` would send them."""
    with helm.Chart.load(chart) as loaded:
        files = loaded.render(values or {}, name=release, namespace=namespace, is_install=True)
    documents = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [d for d in yaml.safe_load_all(text) if d]
    return documents


def notes(values: dict[str, Any] | None = None, release: str = "test") -> str:
    with helm.Chart.load(CHART) as loaded:
        files = loaded.render(values or {}, name=release, namespace="ml", is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def component(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of `kind` whose app.kubernetes.io/component is `name`."""
    found = [
        d
        for d in of_kind(documents, kind)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == name
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects of component {name}"
    return found[0]


def server_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == "sparseserve")
    return container


def config_map_data(documents: list[dict[str, Any]]) -> dict[str, str]:
    return component(documents, "ConfigMap", "server")["data"]


def mounted_file(documents: list[dict[str, Any]], path: str) -> str:
    """The contents of the ConfigMap file the server container sees at `path`."""
    container = server_container(documents)
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{path} is on volume {volume}, not a ConfigMap"
        data = config_map_data(documents)
        key = path[len(prefix) :]
        assert key in data, f"{path}: ConfigMap has no key {key!r} (keys: {sorted(data)})"
        return data[key]
    raise AssertionError(f"no volume of the server container is mounted at {path}")


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a parsed manifest, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)
