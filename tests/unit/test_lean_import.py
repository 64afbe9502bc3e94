"""The serving path stays lean: importing the server, or running its command line, pulls
in none of the heavy or client-side packages (torch, tritonclient, scikit-learn, the
onnx package). Each check runs in a fresh interpreter, since this test process has
imported all of them already."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# onnxruntime is what serves; `onnx` (the model-building package) is not needed for that.
FORBIDDEN = ("torch", "tritonclient", "sklearn", "onnx")
SERVER_MODULES = ("sparseserve.server.app", "sparseserve.cli", "sparseserve.dataplane",
                  "sparseserve.registry")  # fmt: skip


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSESERVE_")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def forbidden_in(modules: set[str]) -> list[str]:
    """The forbidden top-level packages among `modules` (submodules count)."""
    return sorted({m.split(".")[0] for m in modules} & set(FORBIDDEN))


def test_importing_the_server_imports_no_heavy_packages() -> None:
    code = (
        f"import json, sys\nimport {', '.join(SERVER_MODULES)}\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert set(SERVER_MODULES) <= modules  # the imports really happened
    assert forbidden_in(modules) == []


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python -X importtime *args`; every module it imported is listed on stderr."""
    result = run_python("-X", "importtime", *args)
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return result, modules


def test_serve_help_imports_no_heavy_packages() -> None:
    """`sparseserve serve --help`, run for real."""
    result, imported = imported_modules("-m", "sparseserve", "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "--repository" in result.stdout
    assert "sparseserve.cli" in imported
    assert forbidden_in(imported) == []


def test_importtime_check_notices_a_forbidden_import() -> None:
    """The detection works: a child that imports onnx is caught (so the test above
    would fail if the command line imported it)."""
    result, imported = imported_modules("-c", "import onnx")
    assert result.returncode == 0, result.stderr
    assert forbidden_in(imported) == ["onnx"]


def test_inspect_imports_no_heavy_packages(tmp_path) -> None:
    """`sparseserve inspect` runs wherever the server runs: it reads the weights with
    `onnx` (a dependency of the server package for this, and never imported while
    serving), and nothing else heavy."""
    from sparseserve.repository.manifest import VariantManifest
    from sparseserve.testing import onnx_models

    onnx_models.mlp(tmp_path / "1" / "model.onnx")
    VariantManifest(family="f", variant="v", sparsity=0.5).write(tmp_path / "sparseserve.yaml")
    result, imported = imported_modules("-m", "sparseserve", "inspect", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "family f, variant v" in result.stdout
    assert "sparseserve.repository.inspect" in imported
    assert forbidden_in(imported) == ["onnx"]
