"""What every benchmark report holds besides its own numbers: where, with what and how
it was measured (environment(), machine_lines()), the Markdown and JSON it writes
(markdown_table(), write_results()), and the across-rounds figures (Spread, rotated()).
Nothing here measures anything; see bench/measure.py."""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sparseserve.backends.hardware import cpu_features

REPO_ROOT = Path(__file__).resolve().parents[1]
# The versions every report records (environment()["packages"]).
PACKAGES = ("sparseserve", "onnxruntime", "grpcio", "protobuf", "tritonclient", "numpy")


@dataclass(frozen=True, slots=True)
class Spread:
    """Median, min and max of one figure across rounds."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """Levels (or protocols) in a different order each round, so that drift does not
    favour one of them."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(message, file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    """Where and with what the numbers were taken, to reproduce a figure."""
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_features": list(cpu_features()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "git": _git_state(),
        "command": shlex.join(sys.orig_argv),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    """The installed version of `package`, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> dict[str, Any]:
    """The commit, and whether (and where) the work tree differs from it."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.rstrip("\n")

    try:
        changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(changed),
            "changed_paths": changed,
        }
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None, "changed_paths": []}


def fmt_spread(spread: Spread, digits: int = 0) -> str:
    """`median [min, max]` with `digits` decimals."""
    return f"{spread.median:.{digits}f} [{spread.min:.{digits}f}, {spread.max:.{digits}f}]"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1
) -> list[str]:
    """A Markdown table, the first `left` columns left-aligned, the others right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * left + "---:|" * (len(header) - left),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def machine_lines(env: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The Markdown bullets saying where, with what and how a result was measured
    (`extra` bullets go after the versions)."""
    changed = env["git"]["changed_paths"]
    return [
        f"- {env['timestamp']} on `{env['hostname']}`: {env['cpu_model']}, "
        f"{env['cpu_count']} cores, {env['platform']}",
        "- CPU flags that matter for inference: "
        + (", ".join(env.get("cpu_features", [])) or "none"),
        f"- Python {env['python']}; "
        + ", ".join(f"{name} {version}" for name, version in env["packages"].items()),
        *extra,
        f"- git {env['git']['commit']}"
        + (f", uncommitted changes in: {', '.join(changed)}" if env["git"]["dirty"] else ""),
        f"- command: `{env['command']}`",
    ]


def write_results(output_dir: Path, name: str, report: dict, markdown: str) -> None:
    """Write `<name>.json` (every number; dataclasses as dicts) and `<name>.md` into
    `output_dir`, and print the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=asdict) + "\n")
    (output_dir / f"{name}.md").write_text(markdown)
    print(markdown)
