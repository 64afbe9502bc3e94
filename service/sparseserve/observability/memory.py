"""What a loaded model costs in memory and on disk, measured rather than estimated.

The memory a model takes is the growth of the process' resident set across its load and
warm-up: the onnxruntime session, its weights in their optimised layout, and the arenas
its first runs allocate. Asking the allocator is not possible across onnxruntime's C++
heap, so this is the number an operator's `kubectl top` would attribute to the model.
Two loads that overlap would each see the other's growth, so the registry serialises
loads (see `ModelRegistry._load_version`).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    """The process' resident set size now (Linux: /proc/self/statm)."""
    try:
        fields = _STATM.read_text().split()
    except OSError:
        # Elsewhere only the peak is known; growth of the peak still bounds a load's cost.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024
    return int(fields[1]) * _PAGE_BYTES


class ResidentGrowth:
    """``with ResidentGrowth() as growth: load()`` then ``growth.bytes``: resident memory
    gained across the block (0 if it shrank: a load never frees memory of its own)."""

    def __init__(self) -> None:
        self._before = 0
        self.bytes = 0

    def __enter__(self) -> ResidentGrowth:
        self._before = resident_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = max(0, resident_bytes() - self._before)


def directory_bytes(path: Path) -> int:
    """Total size of the regular files under `path` (a version's model and its external
    weight files), not following symlinks out of it."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue  # removed while we walked: a poll will reload it
    return total
