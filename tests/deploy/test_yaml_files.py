"""Every YAML and JSON file under deploy/ and helm/ parses. The chart's templates are
Go templates, not YAML: they are parsed once rendered (test_chart_render.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.chart import CHART, ROOT

TEMPLATES = CHART / "templates"
YAML_FILES = sorted(
    path
    for folder in (ROOT / "deploy", ROOT / "helm")
    for pattern in ("*.yaml", "*.yml")
    for path in folder.rglob(pattern)
    if not path.is_relative_to(TEMPLATES)
)
JSON_FILES = sorted(
    p for folder in (ROOT / "deploy", ROOT / "helm") for p in folder.rglob("*.json")
)


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_files_are_found() -> None:
    found = {name(p) for p in YAML_FILES}
    assert {"deploy/docker-compose.yml", "helm/sparseserve/Chart.yaml",
            "helm/sparseserve/values.yaml"} <= found  # fmt: skip


@pytest.mark.parametrize("path", YAML_FILES, ids=name)
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert documents, f"{name(path)} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=name)
def test_json_parses(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


def test_values_schema_is_a_valid_json_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    # And it means what Helm makes of it: the defaults pass, a wrong type does not.
    validator = jsonschema.Draft7Validator(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert list(validator.iter_errors(defaults)) == []
    assert list(validator.iter_errors({**defaults, "replicaCount": "two"}))


def test_templates_are_not_parsed_as_yaml() -> None:
    """They are left out above on purpose: each one is a Go template."""
    assert all("{{" in p.read_text(encoding="utf-8") for p in TEMPLATES.glob("*.yaml"))
