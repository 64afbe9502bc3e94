"""Your own torch model through `sparseserve sparsify`: a recipe lists the Python file that
registers its architecture and data source under `catalog:` (recipes/own-model, as
docs/sparsify.md shows), is built, served and answered; and the mistakes a user makes
with one (a file that is not there or raises, a forward that takes other inputs or
returns a dict) are one line naming the rule, before any training."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml

from sparseserve.cli import main
from sparseserve.client.server_process import ServerProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "recipes" / "own-model" / "wine.yaml"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def sparsify(recipe: Path, repository: Path, cwd: Path) -> Run:
    """`sparseserve sparsify` in this process (torch is imported once for all the tests
    here, not once per build), from `cwd`."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["sparsify", "--recipe", str(recipe), "--repository", str(repository),
                         "--quiet", "--no-checkpoints"])  # fmt: skip
    finally:
        os.chdir(previous)
    return Run(code, out.getvalue(), err.getvalue())


def test_the_example_builds_serves_and_answers(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Run from another folder: `catalog:` resolves against the recipe's own."""
    built = sparsify(EXAMPLE, tmp_path / "models", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    dense = yaml.safe_load(
        (tmp_path / "models" / "wine-mlp.dense" / "sparseserve.yaml").read_text()
    )
    assert dense["description"] == "MLP 13-64-32-3 on scikit-learn's wine measurements"
    (accuracy,) = [q["value"] for q in dense["quality"] if q["metric"] == "accuracy"]
    assert accuracy > 0.9
    pruned = yaml.safe_load(
        (tmp_path / "models" / "wine-mlp.pruned80" / "sparseserve.yaml").read_text()
    )
    assert pruned["sparsity"] == pytest.approx(0.8, abs=0.02)
    stale = tmp_path / "models" / "wine-mlp.int8" / "2"  # a version left from before
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"old")
    again = sparsify(EXAMPLE, tmp_path / "models", cwd=tmp_path)
    assert "(replacing the model that was there)" in again.stdout
    assert "wine-mlp.int8 also holds version(s) [2] from before" in again.stderr
    stale.joinpath("model.onnx").unlink()
    stale.rmdir()
    server = start_server(tmp_path / "models")
    with triton.InferenceServerClient(server.grpc_url) as client:
        tensor = triton.InferInput("features", [2, 13], "FP32")
        tensor.set_data_from_numpy(np.zeros((2, 13), np.float32))
        assert client.infer("wine-mlp", [tensor]).as_numpy("logits").shape == (2, 3)


MODEL_FILE = """
from torch import nn
from sparseserve.sparsify.catalog import Architecture, ModelInput, register_architecture

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward({signature}):
        {body}

register_architecture(Architecture("{name}", Model, (ModelInput("pixels", (64,)),), "mine"))
"""


def recipe_with(tmp_path: Path, name: str, catalog: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"version: 1\nfamily: mine\ncatalog: [{catalog}]\n"
        f"base: {{architecture: {name}, steps: [{{train: {{epochs: 1}}}}]}}\n"
        "data: {source: sklearn-digits}\nvariants: [{name: dense}]\n"
    )
    return recipe


@pytest.mark.parametrize(
    ("signature", "body", "expected"),
    [
        ("self, x", 'return {"logits": self.fc(x)}',
         "its forward returned a dict; it must return one tensor, the output 'logits'"),
        ("self, x", "return self.fc(x), x",
         "its forward returned a tuple; it must return one tensor"),
        ("self, x, scale", "return self.fc(x) * scale",
         "its forward cannot take one batch of the data source 'sklearn-digits' "
         "(pixels [2, 64]): TypeError"),
        ("self, x", "return self.fc(x)[:, :3]",
         "its forward returns 3 logits a sample, but the data source 'sklearn-digits' has "
         "10 classes (labels 0 to 9): its last layer needs 10 outputs"),
    ],
    ids=["dict", "tuple", "two-inputs", "too-few-classes"],
)  # fmt: skip
def test_a_forward_the_pipeline_cannot_drive_is_refused_before_training(
    tmp_path: Path, signature: str, body: str, expected: str
) -> None:
    (tmp_path / "mine.py").write_text(
        MODEL_FILE.format(signature=signature, body=body, name="my-model")
    )
    result = sparsify(recipe_with(tmp_path, "my-model", "mine.py"), tmp_path / "models", tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert "train: epoch" not in result.stdout  # refused before any training
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("catalog", "contents", "expected"),
    [
        ("missing.py", None, "catalog: 'missing.py': no such file"),
        ("broken.py", "raise ValueError('no weights here')",
         "catalog: importing 'broken.py' failed: ValueError: no weights here"),
        ("no_such_module_anywhere", None,
         "catalog: importing 'no_such_module_anywhere' failed: ModuleNotFoundError"),
    ],
    ids=["missing", "raises", "no-module"],
)  # fmt: skip
def test_a_catalog_entry_that_cannot_be_imported_is_one_line(
    tmp_path: Path, catalog: str, contents: str | None, expected: str
) -> None:
    if contents is not None:
        (tmp_path / catalog).write_text(contents)
    result = sparsify(recipe_with(tmp_path, "digits-mlp", catalog), tmp_path / "m", tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert expected in line, line


def test_an_unknown_architecture_points_to_the_catalog(tmp_path: Path) -> None:
    recipe = tmp_path / "plain.yaml"
    recipe.write_text(
        "version: 1\nfamily: mine\nbase: {architecture: my-mlp}\n"
        "data: {source: sklearn-digits}\nvariants: [{name: dense}]\n"
    )
    result = sparsify(recipe, tmp_path / "m", tmp_path)
    assert result.returncode == 2
    assert "unknown architecture 'my-mlp'" in result.stderr
    assert "lists under `catalog:`" in result.stderr


def test_a_catalog_file_imports_its_own_helpers_beside_it(tmp_path: Path) -> None:
    """The architecture in a helper module next to the catalog file, as a user splits
    code; the build trains (one epoch) and writes the variant."""
    (tmp_path / "layers.py").write_text(
        "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(64, 10))\n"
    )
    (tmp_path / "mine.py").write_text(
        "from layers import build\n"
        "from sparseserve.sparsify.catalog import Architecture, ModelInput, register_architecture\n"
        'register_architecture(Architecture("split", build, (ModelInput("pixels", (64,)),), "x"))\n'
    )
    result = sparsify(recipe_with(tmp_path, "split", "mine.py"), tmp_path / "models", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "mine.dense" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("sample_shape", "expected"),
    [
        ("(31,)", "declares input 'pixels' of shape [31] (31 values a sample), but the data "
         "source 'sklearn-digits' gives rows of shape [64] (64 values): make ModelInput's "
         "sample_shape the shape of one row, without the batch dimension"),
        ("(32,)", "declares input 'pixels' of shape [32] (32 values a sample)"),
        ("(1, 64)", "its forward returned shape [2, 1, 10] for 2 samples (pixels [2, 1, 64]); "
         "it must return [samples, classes] (is the batch dimension in ModelInput's "
         "sample_shape?)"),
    ],
    ids=["other-width", "half-width", "batch-in-shape"],
)  # fmt: skip
def test_a_sample_shape_that_does_not_fit_the_rows_is_refused_before_training(
    tmp_path: Path, sample_shape: str, expected: str
) -> None:
    """Rows of 64 pixels: 31 values a sample cannot be them, 32 would have made two samples
    of each row without a word, and a batch dimension inside the sample shape made the
    classifier's output 3-D (torch's "Expected target size" minutes later)."""
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n"
        "from sparseserve.sparsify.catalog import Architecture, ModelInput, register_architecture\n"
        f"shape = {sample_shape}\n"
        "build = lambda: nn.Sequential(nn.Linear(shape[-1], 10))  # noqa: E731\n"
        'register_architecture(Architecture("shaped", build, (ModelInput("pixels", shape),), ""))\n'
    )
    result = sparsify(recipe_with(tmp_path, "shaped", "mine.py"), tmp_path / "models", tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr
    assert not (tmp_path / "models").exists()


def test_each_catalog_has_its_own_helpers(tmp_path: Path) -> None:
    """Two recipes in one process, each with a layers.py beside its catalog file of a
    different width: each catalog imports the file beside it. (A helper named like an
    installed package comes first too, unless that package was imported before: the
    whole test suite's process has imported most of them.)"""
    for name, width in (("one", 2), ("two", 3)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "layers.py").write_text(f"WIDTH = {width}\n")
        (folder / "mine.py").write_text(
            "from torch import nn\n"
            "from layers import WIDTH\n"
            "from sparseserve.sparsify.catalog import Architecture, ModelInput, "
            "register_architecture\n"
            f'register_architecture(Architecture("w{name}", lambda: nn.Sequential('
            f'nn.Linear(64, WIDTH), nn.Linear(WIDTH, 10)), (ModelInput("pixels", (64,)),), ""))\n'
        )
        result = sparsify(recipe_with(folder, f"w{name}", "mine.py"), folder / "m", folder)
        assert result.returncode == 0, result.stderr
        manifest = yaml.safe_load((folder / "m" / "mine.dense" / "sparseserve.yaml").read_text())
        assert manifest["layers"][0]["shape"] == [width, 64], manifest["layers"]
