"""`eval.npz` and `compare --data` files: what they hold, what is refused and why, and
how their rows become each request of the load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparseserve.compare.loadgen import InputSpec, fit_to_inputs, request_batches
from sparseserve.repository.eval_data import (
    EvalData,
    EvalDataError,
    read_eval_data,
    write_eval_data,
)

PIXELS = InputSpec("image", "FP32", (1, 1, 8, 8))


def test_written_rows_labels_and_description_read_back(tmp_path: Path) -> None:
    rows = np.arange(700 * 64, dtype=np.float32).reshape(700, 64)
    path = write_eval_data(tmp_path / "m" / "eval.npz", {"image": rows}, "test digits",
                           labels=np.arange(700) % 10)  # fmt: skip
    data = read_eval_data(path)
    assert data.rows == 512  # a sample, not the whole split
    np.testing.assert_array_equal(data.inputs["image"], rows[:512])
    np.testing.assert_array_equal(data.labels, np.arange(512) % 10)
    assert data.description == "test digits"
    assert data.path == path


def test_labels_under_the_name_manifest_takes_count_as_labels(tmp_path: Path) -> None:
    """The README's `np.savez("eval.npz", ..., labels=y)` for `manifest --data`: compare
    read `labels` as an input and measured no accuracy, without a word."""
    rows, labels = np.ones((4, 64), np.float32), np.arange(4)
    np.savez(tmp_path / "eval.npz", image=rows, labels=labels)
    data = read_eval_data(tmp_path / "eval.npz")
    assert list(data.inputs) == ["image"]
    np.testing.assert_array_equal(data.labels, labels)
    np.savez(tmp_path / "both.npz", image=rows, labels=labels, __labels__=labels + 1)
    np.testing.assert_array_equal(read_eval_data(tmp_path / "both.npz").labels, labels + 1)


def test_an_npy_is_the_rows_of_a_one_input_model(tmp_path: Path) -> None:
    np.save(tmp_path / "rows.npy", np.ones((3, 64)))
    data = read_eval_data(tmp_path / "rows.npy")
    assert (list(data.inputs), data.rows, data.labels) == (["rows"], 3, None)
    assert list(fit_to_inputs(data, [PIXELS])) == ["image"]  # one array, one input


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"a": np.ones((3, 2)), "b": np.ones((4, 2))}, "inputs differ in row count"),
        ({"a": np.ones((0, 2))}, "no rows"),
        ({"a": np.array(1.0)}, r"hold no rows \(0-d arrays\)"),
        ({"__labels__": np.ones(3)}, "no input arrays"),
    ],
)
def test_files_that_hold_no_usable_rows_are_refused(
    tmp_path: Path, arrays: dict, message: str
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EvalDataError, match=message):
        read_eval_data(tmp_path / "bad.npz")


def test_a_file_that_is_not_numpy_is_named(tmp_path: Path) -> None:
    (tmp_path / "rows.npz").write_text("pixel,value\n")
    with pytest.raises(EvalDataError, match=r"rows\.npz: cannot be read as numpy rows"):
        read_eval_data(tmp_path / "rows.npz")
    # Texts saved as Python objects: how to write rows, not numpy's allow_pickle advice.
    np.save(tmp_path / "texts.npy", np.array(["a", None], dtype=object))
    with pytest.raises(
        EvalDataError, match=r"holds Python objects.*np\.savez\('rows\.npz'"
    ) as info:
        read_eval_data(tmp_path / "texts.npy")
    assert "allow_pickle" not in str(info.value)
    # A truncated file keeps numpy's reason.
    np.save(tmp_path / "rows.npy", np.zeros((100, 64)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "rows.npy").read_bytes()[:1000])
    with pytest.raises(EvalDataError, match=r"cut\.npy: cannot be read as numpy rows \(.*6400"):
        read_eval_data(tmp_path / "cut.npy")


def test_rows_are_reshaped_and_cast_to_the_input() -> None:
    data = EvalData({"image": np.ones((5, 64), dtype=np.float64)}, "rows")
    fitted = fit_to_inputs(data, [PIXELS])["image"]
    assert (fitted.shape, fitted.dtype) == ((5, 1, 8, 8), np.float32)


def test_rows_of_the_wrong_kind_are_refused_naming_the_input() -> None:
    ids = InputSpec("ids", "INT64", (1, 4))
    with pytest.raises(ValueError, match="'ids' is float64, the model wants INT64"):
        fit_to_inputs(EvalData({"ids": np.ones((2, 4))}, "rows"), [ids])
    mask = InputSpec("mask", "INT64", (1, 4))
    with pytest.raises(ValueError, match=r"no array for input\(s\) \['mask'\]"):
        fit_to_inputs(EvalData({"ids": np.ones((2, 4), dtype=np.int64)}, "rows"), [ids, mask])


def test_the_load_cycles_through_every_row() -> None:
    rows = {"x": np.arange(5)[:, None], "y": np.arange(5)[:, None] * 10}
    batches = request_batches(rows, batch=2)
    taken = [next(batches) for _ in range(4)]
    assert [b["x"].ravel().tolist() for b in taken] == [[0, 1], [2, 3], [4, 0], [1, 2]]
    assert [b["y"].ravel().tolist() for b in taken][2] == [40, 0]  # inputs stay paired
