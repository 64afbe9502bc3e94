"""How many cores the server sizes itself for: affinity and cgroup CPU limits, not the
host's core count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparseserve.cpu import cgroup_cpu_quota, usable_cores
from sparseserve.settings import Settings


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def test_cgroup_v2_limit_is_quota_over_period(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(cgroup_v2(tmp_path / "a", "150000 100000")) == 1.5
    assert cgroup_cpu_quota(cgroup_v2(tmp_path / "b", "max 100000")) is None


def test_cgroup_v1_limit_and_no_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def test_a_cpu_limit_caps_the_cores_rounding_up(tmp_path: Path) -> None:
    """A limit of 0.5 core still leaves one thread; 1.5 cores allow two, if the
    affinity has them."""
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(cgroup_v2(tmp_path / "half", "50000 100000")) == 1
    assert usable_cores(cgroup_v2(tmp_path / "one-half", "150000 100000")) == min(2, affinity)
    assert usable_cores(tmp_path / "none") == affinity


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_server_pinned_to_one_core_starts_one_inference_thread() -> None:
    """`taskset -c N`: one usable core, so one inference thread by default, whatever
    the host has; an explicit setting still wins."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        "from sparseserve.settings import Settings; "
        "print(Settings().inference_thread_count, Settings(inference_threads=3)"
        ".inference_thread_count)"
    )
    out = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, "-c", code],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split() == ["1", "3"]


def test_the_default_is_the_usable_cores() -> None:
    assert Settings().inference_thread_count == usable_cores()
