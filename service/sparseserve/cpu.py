"""How many CPU cores this process may use: the cores it may be scheduled on (its
affinity: `taskset`, cpusets, Kubernetes' static CPU manager), capped by a cgroup CPU
quota (a container's CPU limit), rounded up. `os.cpu_count()` reports the host's cores
in both cases, and a server sized by it starts more inference threads than it has cores:
threads that then only take turns on the same cores (bench/results/batching.md: two
batches at once on one core gave mlp_large 658 req/s, one at a time 935)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in cores (quota / period), or None when
    there is none: cgroup v2's `cpu.max` ("max 100000" is no limit), else cgroup v1's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 is no limit)."""
    try:
        text = (cgroup_root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
