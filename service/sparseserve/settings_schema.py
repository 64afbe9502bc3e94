"""The JSON schema of the server's settings, kept in the Helm chart's values.schema.json.

The chart's `config` value is the YAML file `sparseserve serve --config` reads. Helm
checks values against values.schema.json at install time, so putting the settings'
own schema there makes `helm install` refuse an unknown or mistyped setting with a
message that names it, instead of a pod that exits at start. The schema is generated
from `Settings` (never written by hand, so it cannot drift): run

    python -m sparseserve.settings_schema helm/sparseserve/values.schema.json

after changing the settings; `--check` (the tests) fails when the file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseserve.settings import Settings

# Settings the chart derives from its own values (ports, mounts, drain time); a user
# who sets them in `config` is told where they belong by the schema's refusal.
CHART_OWNED = (
    "repository", "host", "grpc_address", "grpc_port", "http_port", "metrics_port",
    "shutdown_grace_seconds",
    # From the values `tls` and `restrictedProtocols`, whose files come from Secrets.
    "grpc_tls", "grpc_restricted_protocols", "http_restricted_apis",
)  # fmt: skip
ROOT = "ServerSettings"
GENERATED = (
    "generated from sparseserve.settings.Settings by `python -m sparseserve.settings_schema`"
)


def _strip_titles(node: Any) -> Any:
    """pydantic's titles repeat the field names; leave descriptions, bounds and enums."""
    if isinstance(node, dict):
        # A string: a *setting* called "title" would be a mapping, and stays.
        return {
            k: _strip_titles(v)
            for k, v in node.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


def settings_definitions(exclude: Sequence[str] = CHART_OWNED) -> dict[str, Any]:
    """`$defs` entries: ServerSettings (the settings file, less `exclude`) and the
    nested models and enums it refers to, each marked as generated."""
    schema = _strip_titles(Settings.model_json_schema())
    definitions: dict[str, Any] = schema.pop("$defs", {})
    for name in exclude:
        schema["properties"].pop(name)
    schema["additionalProperties"] = False
    schema["description"] = (
        "sparseserve's settings (README 'Configuration'). The chart sets "
        + ", ".join(exclude)
        + " from its own values."
    )
    return {
        name: {"$comment": GENERATED, **definition}
        for name, definition in {ROOT: schema, **definitions}.items()
    }


def updated(values_schema: dict[str, Any]) -> dict[str, Any]:
    """`values_schema` with its generated definitions replaced by current ones."""
    kept = {
        name: definition
        for name, definition in values_schema.get("$defs", {}).items()
        if definition.get("$comment") != GENERATED
    }
    return {**values_schema, "$defs": {**kept, **settings_definitions()}}


def render(values_schema: dict[str, Any]) -> str:
    return json.dumps(values_schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("schema", type=Path, help="the chart's values.schema.json")
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    current = args.schema.read_text(encoding="utf-8")
    fresh = render(updated(json.loads(current)))
    if current == fresh:
        return 0
    if args.check:
        print(
            f"{args.schema} is stale: the server's settings changed. Run "
            f"`python -m sparseserve.settings_schema {args.schema}`.",
            file=sys.stderr,
        )
        return 1
    args.schema.write_text(fresh, encoding="utf-8")
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
