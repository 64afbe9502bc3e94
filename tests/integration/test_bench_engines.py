"""bench/engines.py --server in miniature: a real server serves one model per engine,
selected by config.pbtxt `backend:`; an engine the server does not have is reported as
not available instead of being timed under its name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_server_run_times_each_engine_the_server_really_has(tmp_path: Path) -> None:
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.engines", "--quick", "--server",
         "--repository", str(tmp_path / "no-minilm"), "--mlp", "16-32-4",
         "--output-dir", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "engines.json").read_text())
    rows = {(row["engine"], row["concurrency"]): row for row in report["server"]}
    assert sorted(rows) == [("onnxruntime", 1), ("onnxruntime", 32),
                            ("openvino", 1), ("openvino", 32)]  # fmt: skip
    for (engine, _), row in rows.items():
        if engine == "openvino" and row["unavailable"] is not None:
            # The server served the model with another backend: nothing timed under
            # OpenVINO's name.
            assert row["unavailable"].startswith("openvino backend not available"), row
            assert "requests_per_second" not in row, row
        else:
            assert row["requests_per_second"] > 0, row
            assert row["relative_difference_to_onnxruntime"] <= 1e-4, row
    assert "## Through the server" in (output / "engines.md").read_text()


def test_quick_auto_engine_run_reports_the_choice_and_the_ratio(tmp_path: Path) -> None:
    """bench/auto_engine.py in miniature: a one-model repository of the demo's kind and an
    MLP, each served pinned to onnxruntime and with auto; the report names what auto
    chose (from the server's metrics), the warm-up medians it chose by, and the ratio."""
    from sparseserve.testing import onnx_models

    repository = tmp_path / "repository"
    onnx_models.mlp(repository / "digits" / "1" / "model.onnx")
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.auto_engine", "--quick", "--repository", str(repository),
         "--mlp", "16-32-4", "--output-dir", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "auto_engine.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert sorted(rows) == ["digits", "mlp-16-32-4"]
    for row in rows.values():
        assert row["auto_chose"] in ("onnxruntime", "openvino"), row
        assert set(row["candidate_warmup_ms"]) == {"onnxruntime", "openvino"}, row
        assert row["auto_vs_onnxruntime"]["median"] > 0, row
        assert row["p50_ms"]["onnxruntime"] > 0 and row["p50_ms"]["auto"] > 0, row
    assert (
        "auto against onnxruntime on 2 models; auto chose"
        in (output / "auto_engine.md").read_text()
    )


def test_quick_served_speedups_run_reports_each_route_and_the_targets(tmp_path: Path) -> None:
    """bench/served_speedups.py in miniature (the small MLP): every route is either timed
    against the reference with the engine, precision and sparse-kernel count the server
    reported, or says why it did not load (a bf16 route on a CPU without bf16); the
    issue's MLP target is checked either way."""
    output = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.served_speedups", "--quick", "--output-dir", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "served_speedups.json").read_text())
    timed = [row for row in report["rows"] if "unavailable" not in row]
    assert {(row["route"], row["concurrency"]) for row in timed} >= {
        ("mlp--onnxruntime", 1), ("mlp--onnxruntime", 32),
        ("mlp.sparse90-int8--openvino-sparse", 32),
    }  # fmt: skip
    for row in timed:
        assert row["served_by"] in ("onnxruntime", "openvino"), row
        assert row["precision"] in ("fp32", "bf16"), row
        assert row["sparse_kernel_layers"] >= 0, row
        assert row["speedup"]["median"] > 0 and row["requests_per_second"] > 0, row
        if row["route"] in ("mlp--onnxruntime", "mlp--auto"):
            assert row["quality"]["relative_error"] <= 1e-5, row
    pinned = {row["route"]: row["served_by"] for row in timed}
    assert pinned["mlp.sparse90-int8--openvino"] == "openvino"
    assert pinned["mlp.sparse90-int8--onnxruntime"] == "onnxruntime"
    bf16 = [row for row in report["rows"] if row["route"] == "mlp.bf16--auto"]
    (target,) = report["targets"]
    assert target["route"] == "mlp.bf16--auto"
    if "unavailable" in bf16[0]:
        assert "bf16" in bf16[0]["unavailable"] and target["met"] is False
    else:
        assert {row["precision"] for row in bf16} == {"bf16"}
    assert "## The issue's targets" in (output / "served_speedups.md").read_text()
