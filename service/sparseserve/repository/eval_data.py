"""`eval.npz`: a sample of the data a family was built for, beside its baseline's manifest.

`sparseserve sparsify` writes it into the baseline's model directory (Triton ignores
files it does not know there) so that `sparseserve compare` measures agreement, and
drives its load, with rows the model was made for instead of random numbers. The file
is a plain numpy `.npz`: one array per model input, named as the input, rows first.
Keys that start with `__` are not inputs: `__description__` says what the rows are
(a 0-d string array) and `__labels__` (or `labels`, as `manifest --data` takes them),
when the task has them, holds the true classes.

A user's own `--data` file uses the same layout (or a bare `.npy`, for a model with
one input, whatever the input's name).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EVAL_DATA_FILENAME = "eval.npz"
# Enough rows for an agreement figure to two digits, small enough to ship with a model.
EVAL_SAMPLE_ROWS = 512
DESCRIPTION_KEY = "__description__"
LABELS_KEY = "__labels__"
PLAIN_LABELS_KEY = "labels"  # taken too where there is no `__labels__`


class EvalDataError(ValueError):
    """An evaluation data file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class EvalData:
    """Rows to send a model: arrays by input name, the same number of rows in each."""

    inputs: dict[str, np.ndarray]
    description: str
    labels: np.ndarray | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise EvalDataError(f"{self.description}: no input arrays")
        scalars = [name for name, array in self.inputs.items() if np.ndim(array) == 0]
        if scalars:
            raise EvalDataError(f"{self.description}: {scalars} hold no rows (0-d arrays)")
        counts = {name: len(array) for name, array in self.inputs.items()}
        if len(set(counts.values())) != 1:
            raise EvalDataError(f"{self.description}: inputs differ in row count: {counts}")
        if self.rows == 0:
            raise EvalDataError(f"{self.description}: no rows")
        if self.labels is not None and len(self.labels) != self.rows:
            raise EvalDataError(
                f"{self.description}: {len(self.labels)} labels for {self.rows} rows"
            )

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))


def write_eval_data(
    path: Path,
    inputs: dict[str, np.ndarray],
    description: str,
    labels: np.ndarray | None = None,
    max_rows: int = EVAL_SAMPLE_ROWS,
) -> Path:
    """Write the first `max_rows` rows of `inputs` (and `labels`) to `path`."""
    arrays = {name: np.ascontiguousarray(array[:max_rows]) for name, array in inputs.items()}
    if labels is not None:
        arrays[LABELS_KEY] = np.asarray(labels[:max_rows])
    arrays[DESCRIPTION_KEY] = np.array(description)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:  # np.savez would append .npz to a name without it
        # allow_pickle (numpy's default) given by name: numpy's stubs would otherwise
        # read `**arrays` as possibly naming it.
        np.savez_compressed(stream, allow_pickle=True, **arrays)
    return path


def read_eval_data(path: Path) -> EvalData:
    """Read an `.npz` (arrays by input name) or an `.npy` (the rows of a model with one
    input, named here by the file's stem). Raise `EvalDataError` saying what is wrong."""
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            return EvalData({path.stem: array}, path.name, path=path)
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        # numpy's own advice (allow_pickle) is not what to do here: say what the file is for.
        reason = (
            "it holds Python objects or is no numpy file: save numeric (or fixed-width string) "
            "arrays, np.savez('rows.npz', <input name>=rows, ...), or np.save('rows.npy', "
            "rows) for a one-input model"
            if "allow_pickle" in str(exc)
            else str(exc)
        )
        raise EvalDataError(f"{path}: cannot be read as numpy rows ({reason})") from exc
    description = str(arrays.pop(DESCRIPTION_KEY, path.name))
    labels = arrays.pop(LABELS_KEY, None)
    if labels is None:  # the name `manifest --data` also takes (README)
        labels = arrays.pop(PLAIN_LABELS_KEY, None)
    arrays = {name: a for name, a in arrays.items() if not name.startswith("__")}
    if not arrays:
        raise EvalDataError(f"{path}: no input arrays (one array per model input name)")
    return EvalData(arrays, description, labels, path)
