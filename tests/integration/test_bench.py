"""The load benchmarks in bench/ run end to end, in miniature: every arm's server
starts, answers what onnxruntime computes (each script checks that before timing), and
the script writes its JSON and Markdown. The numbers of such short runs mean nothing;
what is checked is that the scripts behind bench/results/ still work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"


def cores() -> list[str]:
    """A server core and a client core this process may use (the same one if only one)."""
    usable = sorted(os.sched_getaffinity(0))
    return ["--server-cpu", str(usable[0]), "--client-cpu", str(usable[-1])]


def run_bench(script: str, output: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args, *cores(), "--output-dir", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    name = script.removesuffix(".py")
    markdown = (output / f"{name}.md").read_text()
    assert markdown.startswith("# "), markdown[:200]
    assert "## Machine" in markdown, markdown[-500:]
    return json.loads((output / f"{name}.json").read_text())


# The scripts that need neither torch nor the peers' venvs to import.
IMPORTABLE_WITHOUT_TORCH = (
    "batching", "compare_servers", "engines", "grpc_floor", "profile_server", "request_memory",
    "rest", "server_overhead", "shadow", "soak", "threads", "versus_commit",
)  # fmt: skip


def test_bench_is_a_package_its_scripts_import_from() -> None:
    """`python -m bench.<script>` (the documented way) imports every script and the
    shared modules as the package; run_bench() below covers `python bench/<script>.py`."""
    modules = ", ".join(f"bench.{name}" for name in IMPORTABLE_WITHOUT_TORCH)
    done = subprocess.run(
        [sys.executable, "-c", f"import {modules}; print(bench.report.__file__)"],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()) == BENCH / "report.py"


def test_grpc_floor_runs_every_arm(tmp_path: Path) -> None:
    report = run_bench(
        "grpc_floor.py", tmp_path, "--rounds", "1", "--concurrency", "2",
        "--requests", "200", "--warmup", "10",
    )  # fmt: skip
    arms = report["setup"]["arms"]
    assert {"aio, empty", "grpclib, empty", "sync, sparseserve's path", "sparseserve"} <= set(arms)
    level = report["summary"]["2"]
    for arm in arms:
        assert level[arm]["requests_per_s"]["median"] > 0, arm
    assert "sparseserve's own work" in level["parts_us"]
    assert report["in_process"]["sparseserve_request_path_us"] > 0


def test_server_overhead_runs_both_protocols(tmp_path: Path) -> None:
    report = run_bench(
        "server_overhead.py", tmp_path, "--rounds", "1", "--concurrency", "2",
        "--requests", "200", "--warmup", "10", "--ort-runs", "50", "--ort-cold-runs", "5",
        "--flush-mib", "1",
    )  # fmt: skip
    runs = report["level_runs"]
    assert {run["protocol"] for run in runs} == {"unary", "stream"}
    assert all(run["requests"] > 0 and run["errors"] == 0 for run in runs)
    assert {run["caches"] for run in report["onnxruntime_runs"]} == {"hot", "cold"}


def test_versus_commit_runs_both_servers_on_both_workloads(tmp_path: Path) -> None:
    """Against HEAD: the baseline server imports the exported tree, the other this
    checkout, and both are measured on both workloads."""
    report = run_bench(
        "versus_commit.py", tmp_path, "--baseline", "HEAD", "--rounds", "1",
        "--warmup", "10", "--requests", "60",
    )  # fmt: skip
    assert len(report["baseline_commit"]) == 40 and report["candidate_commit"] is None
    runs = {(run["arm"], run["workload"]) for run in report["runs"]}
    assert runs == {
        (arm, workload) for arm in ("this", "baseline") for workload in ("small", "large-batched")
    }
    assert all(run["requests"] == 60 for run in report["runs"])
    assert set(report["summary"]) == {"small", "large-batched"}


def test_batching_runs_on_and_off(tmp_path: Path) -> None:
    report = run_bench(
        "batching.py", tmp_path, "--rounds", "1", "--levels", "mlp_small@4",
        "--requests", "200", "--warmup", "10",
    )  # fmt: skip
    assert {run["batching"] for run in report["runs"]} == {"on", "off"}
    on = [run for run in report["runs"] if run["batching"] == "on"]
    assert on[0]["average_batch_requests"] >= 1


@pytest.mark.slow
def test_request_memory_runs_both_scenarios(tmp_path: Path) -> None:
    """bench/request_memory.py end to end with small requests (two servers, ~15 s)."""
    done = subprocess.run(
        [
            sys.executable, str(BENCH / "request_memory.py"), "--request-mib", "2",
            "--concurrency", "2", "--idle-seconds", "0.2", "--invalid-mib", "1",
            "--invalid-count", "2", "--output-dir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## Machine" in (tmp_path / "request_memory.md").read_text()
    report = json.loads((tmp_path / "request_memory.json").read_text())
    assert report["concurrent"]["statuses"] == {"OK": 2}
    assert report["invalid"]["statuses"] == {"INVALID_ARGUMENT": 2}


def test_rest_runs_sparseserve_with_json_and_binary_tensors(tmp_path: Path) -> None:
    """sparseserve's arms only: the peers' venvs are built from PyPI on first use."""
    report = run_bench(
        "rest.py", tmp_path, "--servers", "sparseserve", "--rounds", "1",
        "--concurrency", "2", "--requests", "100", "--warmup", "10",
    )  # fmt: skip
    level = report["summary"]["c=2"]
    assert set(level) == {"sparseserve/json", "sparseserve/binary"}
    for entry in level.values():
        assert entry["requests_per_s"]["median"] > 0
    assert report["not_measured"] == {}


def test_soak_loses_nothing_through_swaps_and_restarts(tmp_path: Path) -> None:
    """The soak script in miniature. Unlike the timing scripts its checks are the point:
    it exits non-zero when a request failed while the server was up, when SIGTERM
    cancelled one, or when the corrupt version was served."""
    report = run_bench(
        "soak.py", tmp_path, "--clients", "8", "--phase-seconds", "2",
        "--large-count", "2", "--large-mib", "16",
    )  # fmt: skip
    phases = report["summary"]["phases"]
    assert all(phases[phase]["sent"] > 0 for phase in phases), phases
    assert phases["recovered"]["ok"] > 0
    assert set(report["summary"]["large_requests"]) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert all(report["summary"]["checks"].values()), report["summary"]["checks"]
