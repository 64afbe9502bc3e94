"""`make demo` end to end: train the demo models, serve them, query them, compare."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_trains_serves_compares_and_stops_cleanly(tmp_path: Path) -> None:
    """The demo's own output shows each model answering through the server with the
    accuracy its manifest recorded, the sparse variant beside its dense baseline, and a
    clean stop."""
    repository = tmp_path / "demo-models"
    result = subprocess.run(
        [sys.executable, "-m", "sparseserve.demo", "--repository", str(repository)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    variants = ("dense", "pruned90", "structured50", "int8", "structured50-int8", "nm24")
    expected = [
        "digits-mlp.l1-pruned90",
        "digits-cnn.int8-nncf",
        *(f"{family}.{v}" for family in ("digits-mlp", "digits-cnn") for v in variants),
    ]
    assert f"models ready: {', '.join(sorted(expected))}" in out
    rows = {
        m["model"]: m
        for m in re.finditer(
            r"^(?P<model>digits-\S+)\s+(?P<sparsity>[\d.]+)%\s+\S+\s+\S+\s+"
            r"(?P<served>[\d.]+)%\s+(?P<manifest>[\d.]+)%\s+(?P<agree>\S+)",
            out,
            re.MULTILINE,
        )
    }
    assert set(rows) == set(expected)
    for row in rows.values():
        # Accuracy measured through the server equals what the build measured in-process.
        assert row["served"] == row["manifest"]
        assert float(row["served"]) > 93.0
    for family in ("digits-mlp", "digits-cnn"):
        dense, pruned = rows[f"{family}.dense"], rows[f"{family}.pruned90"]
        assert float(pruned["sparsity"]) == pytest.approx(90.0)
        assert dense["agree"] == "baseline"
        assert float(pruned["agree"].rstrip("%")) > 90.0
        # The target: 90% of the weights gone within one point of dense accuracy.
        assert float(pruned["served"]) >= float(dense["served"]) - 1.0
    # It ends with `sparseserve compare` of each family: a verdict per sparse variant.
    verdict = re.search(r"^  digits-mlp\.pruned90\s.*\s(\S+) agreement$", out, re.MULTILINE)
    assert verdict, out
    # Its agreement, on the same test digits through the same server, is the table's.
    assert verdict.group(1) == rows["digits-mlp.pruned90"]["agree"]
    assert (repository.parent / "demo-models-report" / "digits-mlp" / "report.html").exists()
    assert "server stopped cleanly (exit code 0)" in out
    # It says how the inputs are scaled, and ends with what to try next on this repository.
    assert "scaled to [0, 1] (scikit-learn's 0..16 divided by 16" in out
    assert out.rstrip().splitlines()[-1].startswith("  README.md and docs/")
    assert f"sparseserve inspect {repository}/digits-mlp.pruned90" in out

    # A second run reuses the trained models instead of training again, with a model of
    # the user's own built into the same repository (as the README's own-model example
    # does): it is served and left out of the digits comparison, not sent digits.
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "own-model" / "wine.yaml"
    own = subprocess.run(
        [sys.executable, "-m", "sparseserve", "sparsify", "--recipe", str(recipe),
         "--repository", str(repository), "--quiet", "--no-checkpoints"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
    again = subprocess.run(
        [sys.executable, "-m", "sparseserve.demo", "--repository", str(repository)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "using the demo models in" in again.stdout
    assert f"models ready: {', '.join(sorted(expected))}" in again.stdout
    assert (
        "also served, not digits models, so left out below: "
        "wine-mlp.dense, wine-mlp.int8, wine-mlp.pruned80"
    ) in again.stdout
