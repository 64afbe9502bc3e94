"""Build the demo model repository: the digits-mlp and digits-cnn families, from the
recipes in the repository's ``recipes/`` folder.

    python -m sparseserve.sparsify.demo_models --repository ./models

Everything trains on a CPU in seconds from scikit-learn's bundled digits, so the demo
needs no download. Each variant is written in Triton's layout with its manifest.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from sparseserve.sparsify.digits import DigitsSplit, load_digits_split
from sparseserve.sparsify.pipeline import build_family
from sparseserve.sparsify.recipe import Progress

# service/sparseserve/sparsify/demo_models.py -> the checkout's recipes/ folder.
RECIPES = Path(__file__).resolve().parents[3] / "recipes"
DEMO_RECIPES = ("digits-mlp.yaml", "digits-cnn.yaml")

__all__ = ["DEMO_RECIPES", "RECIPES", "DigitsSplit", "build_demo_repository", "load_digits_split"]


def build_demo_repository(
    repository: Path, *, seed: int = 0, progress: Progress = print, recipes: Path = RECIPES
) -> list[str]:
    """Build every variant of the demo recipes into `repository`; return the model names."""
    names = []
    for filename in DEMO_RECIPES:
        path = recipes / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the demo recipes live in a sparseserve checkout")
        started = time.perf_counter()
        built = build_family(path, repository, progress=progress, seed=seed)
        progress(f"{filename}: {len(built)} variants in {time.perf_counter() - started:.1f} s")
        names += [variant.name for variant in built]
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the demo repository."""
    parser = argparse.ArgumentParser(
        prog="python -m sparseserve.sparsify.demo_models",
        description="Build the digits demo families into a model repository.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository to write into (default: ./models)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    args = parser.parse_args(argv)
    names = build_demo_repository(args.repository, seed=args.seed)
    print(f"wrote {', '.join(names)} to {args.repository}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
