"""`helm lint` and values.schema.json, through Helm's own library: every shipped values
file lints clean and passes the schema, and bad values fail at install time with a
message that names the value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from sparseserve import settings_schema
from sparseserve.settings import Settings
from tests.deploy.chart import CHART, KUBE_VERSIONS, VALUES_FILES, values_of

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


def test_every_deployment_kind_ships_a_values_file() -> None:
    names = {path.name for path in VALUES_FILES}
    assert {"values.yaml", "values-dense.yaml", "values-sparse.yaml", "values-gpu.yaml"} <= names


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_is_clean(values_file: Path, kube_version: str) -> None:
    """helm lint --strict: warnings count as errors; only info messages may remain."""
    report = helm.lint(CHART, values_of(values_file), strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in report["messages"] if m["severity"] >= WARNING]
    assert report["total_charts_linted"] == 1
    assert problems == [] and report["errors"] == []


def test_lint_reports_a_broken_template(tmp_path: Path) -> None:
    """The lint above can fail: a template with a syntax error is an error."""
    chart = shutil.copytree(CHART, tmp_path / "sparseserve")
    (chart / "templates" / "broken.yaml").write_text("kind: {{ .Values.replicaCount \n")
    report = helm.lint(chart, {}, strict=True)
    assert any(m["severity"] > WARNING for m in report["messages"]) or report["errors"]


def test_lint_applies_the_values_it_is_given() -> None:
    """The lint above really lints each values file: bad values make it fail. (Helm's
    lint mode lets `required` and `fail` pass, as the helm CLI does; the render tests
    check those, as an install meets them.)"""
    report = helm.lint(CHART, {"models": {"source": "s3"}}, strict=True)
    errors = [m["error"] for m in report["messages"] if m["severity"] > WARNING]
    assert any("/models/source" in e for e in errors), report


@pytest.mark.parametrize("values_file", VALUES_FILES, ids=lambda p: p.name)
def test_values_file_passes_the_schema(values_file: Path) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values_of(values_file))


BAD_VALUES = [
    ({"ports": {"grpc": "8001", "metrics": 8002}}, "/ports/grpc", "want integer"),
    ({"ports": {"grpc": 70000, "metrics": 8002}}, "/ports/grpc", "maximum"),
    ({"replicaCount": -1}, "/replicaCount", "minimum"),
    ({"models": {"source": "s3"}}, "/models/source", "'image', 'pvc', 'baked'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "Always"),
    ({"autoscaling": {"enabled": "yes"}}, "/autoscaling/enabled", "want boolean"),
    ({"replicas": 3}, "additional properties 'replicas'", ""),
    # Server settings come from sparseserve's own Settings model:
    ({"config": {"grpc_port": 9000}}, "/config", "'grpc_port' not allowed"),
    ({"config": {"no_such_setting": 1}}, "/config", "'no_such_setting' not allowed"),
    ({"config": {"model_control": "sometimes"}}, "/config/model_control", "'explicit'"),
    ({"config": {"onnxruntime": {"intra_op_threads": -1}}}, "intra_op_threads", "minimum"),
    ({"config": {"dispatch_overrides": {"m": "gpu"}}}, "/config/dispatch_overrides/m", "'cpu'"),
    ({"config": {"triton": {"retries": 9}}}, "/config/triton/retries", "maximum"),
    ({"config": {"grpc_tls": {"enabled": True}}}, "/config", "'grpc_tls' not allowed"),
    ({"tls": {"enabled": True}}, "/tls/secretName", "minLength"),
    (
        {"restrictedProtocols": [{"groups": ["models"], "key": "k"}]},
        "/restrictedProtocols/0/groups/0",
        "'model-repository'",
    ),
    (
        {"trafficPolicies": {"families": {"f": {"split": {"dense": 2}}}}},
        "/trafficPolicies/families/f/split/dense",
        "maximum",
    ),
]


@pytest.mark.parametrize(("values", "where", "why"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_values_are_refused_naming_the_value(values: dict[str, Any], where: str, why: str):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(values)
    message = str(refused.value)
    assert where in message and why in message, message


def test_install_refuses_bad_values_before_rendering() -> None:
    """Rendering (what install does) validates too, so the refusal reaches the user."""
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError) as refused:
        chart.render({"config": {"log_format": "xml"}}, name="x", namespace="ml")
    assert "/config/log_format" in str(refused.value)


def test_settings_schema_is_generated_from_the_settings() -> None:
    """values.schema.json carries the current Settings; regenerating changes nothing."""
    path = CHART / "values.schema.json"
    assert settings_schema.main([str(path), "--check"]) == 0
    schema = json.loads(path.read_text(encoding="utf-8"))
    server = schema["$defs"][settings_schema.ROOT]
    owned = set(settings_schema.CHART_OWNED)
    assert set(server["properties"]) == set(Settings.model_fields) - owned
    assert owned <= set(Settings.model_fields)  # the chart owns real settings


def test_a_stale_settings_schema_is_detected(tmp_path: Path) -> None:
    stale = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    del stale["$defs"][settings_schema.ROOT]["properties"]["log_level"]
    path = tmp_path / "values.schema.json"
    path.write_text(settings_schema.render(stale), encoding="utf-8")
    assert settings_schema.main([str(path), "--check"]) == 1
    assert settings_schema.main([str(path)]) == 0  # rewrites it
    assert settings_schema.main([str(path), "--check"]) == 0
