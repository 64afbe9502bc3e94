"""JSON tensors of the v2 REST protocol, through the one datatype table (codec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from sparseserve import codec
from sparseserve.errors import InvalidInput


def decode(datatype: str, shape: list[int], data: object) -> np.ndarray:
    return codec.decode_json_data("x", codec.datatype(datatype), shape, data)


def test_flat_and_nested_data_give_the_same_array() -> None:
    flat = decode("INT32", [2, 3], [1, 2, 3, 4, 5, 6])
    nested = decode("INT32", [2, 3], [[1, 2, 3], [4, 5, 6]])
    assert flat.dtype == np.int32 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)


def test_uint64_keeps_every_digit() -> None:
    top = 2**64 - 1
    array = decode("UINT64", [2], [0, top])
    assert array.dtype == np.uint64 and int(array[1]) == top


def test_bytes_are_utf8_text_both_ways() -> None:
    array = decode("BYTES", [1, 2], [["héllo", ""]])
    assert list(array.reshape(-1)) == ["héllo".encode(), b""]
    assert codec.encode_json_data("y", array) == ["héllo", ""]
    with pytest.raises(InvalidInput, match="not UTF-8"):
        codec.encode_json_data("y", np.array([b"\xff"], dtype=object))


def test_bf16_goes_out_as_json_numbers() -> None:
    array = decode("BF16", [2], [1.5, -2.0])
    assert codec.encode_json_data("y", array) == [1.5, -2.0]


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("INT32", [2], [1.5, 2], "INT32 data must be JSON integers, got 1.5"),
        ("BOOL", [2], [1, 0], "BOOL data must be JSON true/false"),
        ("FP32", [2], ["a", "b"], "FP32 data must be JSON numbers"),
        ("INT8", [2], [1, 300], "value 300 is out of range for INT8"),
        ("UINT64", [1], [2**64], "out of range for UINT64"),
        ("FP32", [3], [1.0, 2.0], "data has 2 elements, shape [3] needs 3"),
        ("FP32", [2, 2], [[1.0, 2.0], [3.0]], "not a regular"),
        ("BYTES", [2], ["a", 1], "BYTES data must be JSON strings"),
        ("FP32", [1], 1.0, "'data' must be a JSON array"),
        # numpy read a boolean among numbers as 1, and named the first element, not the bad one
        ("FP32", [4], [1, 2, 3, True], "FP32 data must be JSON numbers, got True"),
        ("INT32", [3], [1, False, 3], "INT32 data must be JSON integers, got False"),
        ("FP32", [4], [1, 2, 3, None], "FP32 data must be JSON numbers, got None"),
        ("FP32", [4], [1, 2, 3, "4"], "FP32 data must be JSON numbers, got '4'"),
        ("BOOL", [2], [True, 1], "BOOL data must be JSON true/false, got 1"),
        ("FP64", [2], [1, 10**400], "out of range for FP64"),
        ("BYTES", [2], ["a", "\ud800"], "not valid Unicode"),
    ],
)
def test_data_that_does_not_fit_is_invalid_input(
    datatype: str, shape: list[int], data: object, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode(datatype, shape, data)


def test_an_integer_past_int64_is_a_number_for_a_float_datatype() -> None:
    """2**70 is a valid FP32 value written as a JSON integer (it was refused, naming 1)."""
    array = decode("FP32", [2], [1, 2**70])
    assert array.dtype == np.float32 and array.tolist() == [1.0, float(2**70)]
