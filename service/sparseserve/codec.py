"""Tensors on the wire: the one datatype table of sparseserve, and the v2 tensor codec.

Wire facts (Open Inference Protocol): tensors are row-major and little-endian with no
padding; BOOL is one byte; a BYTES element is a 4-byte little-endian length followed by
its bytes; FP16 and BF16 travel only as raw bytes. Clients may send either
`raw_input_contents` (one entry per input, in input order) or typed `contents`, never
both; tritonclient reads results only from `raw_output_contents`, so answers are always
raw, in the order of `outputs`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from sparseserve.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class Datatype:
    """One row of the datatype table: the same type in every vocabulary we speak."""

    name: str  # Open Inference Protocol datatype string
    numpy: np.dtype  # little-endian numpy dtype (object for BYTES)
    contents_field: str | None  # InferTensorContents field; None: raw bytes only
    onnx: str  # onnxruntime's type string
    config: str  # Triton model_config DataType enum name

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


def _row(name: str, dtype: object, field: str | None, onnx: str, config: str) -> Datatype:
    return Datatype(name, np.dtype(dtype).newbyteorder("<"), field, onnx, config)


DATATYPES: tuple[Datatype, ...] = (
    _row("BOOL", np.bool_, "bool_contents", "tensor(bool)", "TYPE_BOOL"),
    _row("UINT8", np.uint8, "uint_contents", "tensor(uint8)", "TYPE_UINT8"),
    _row("UINT16", np.uint16, "uint_contents", "tensor(uint16)", "TYPE_UINT16"),
    _row("UINT32", np.uint32, "uint_contents", "tensor(uint32)", "TYPE_UINT32"),
    _row("UINT64", np.uint64, "uint64_contents", "tensor(uint64)", "TYPE_UINT64"),
    _row("INT8", np.int8, "int_contents", "tensor(int8)", "TYPE_INT8"),
    _row("INT16", np.int16, "int_contents", "tensor(int16)", "TYPE_INT16"),
    _row("INT32", np.int32, "int_contents", "tensor(int32)", "TYPE_INT32"),
    _row("INT64", np.int64, "int64_contents", "tensor(int64)", "TYPE_INT64"),
    _row("FP16", np.float16, None, "tensor(float16)", "TYPE_FP16"),
    _row("BF16", ml_dtypes.bfloat16, None, "tensor(bfloat16)", "TYPE_BF16"),
    _row("FP32", np.float32, "fp32_contents", "tensor(float)", "TYPE_FP32"),
    _row("FP64", np.float64, "fp64_contents", "tensor(double)", "TYPE_FP64"),
    _row("BYTES", np.object_, "bytes_contents", "tensor(string)", "TYPE_STRING"),
)

BY_NAME: Mapping[str, Datatype] = {d.name: d for d in DATATYPES}
BY_ONNX: Mapping[str, Datatype] = {d.onnx: d for d in DATATYPES}
# Keyed by kind and size, not by dtype: numpy has two int64 dtypes on Linux ('l' and 'q',
# onnxruntime returns the latter), and big-endian arrays must find their row too.
_BY_NUMPY: Mapping[tuple[str, int], Datatype] = {
    (d.numpy.kind, d.numpy.itemsize): d for d in DATATYPES if d.name != "BYTES"
}
BYTES = BY_NAME["BYTES"]


def datatype(name: str) -> Datatype:
    """The table row for a v2 datatype string, or `InvalidInput` naming the valid ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise InvalidInput(
            f"unknown datatype {name!r}; expected one of {', '.join(BY_NAME)}"
        ) from None


def datatype_of(array: np.ndarray) -> Datatype:
    """The table row for a numpy array (str/bytes/object arrays are BYTES)."""
    dtype = array.dtype
    if dtype.kind in "OSU":
        return BYTES
    try:
        return _BY_NUMPY[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


_LENGTH = struct.Struct("<I")


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> wire form: each element as 4-byte LE length + bytes, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes, shape: Sequence[int], name: str) -> np.ndarray:
    """Wire form -> object array of `bytes`, checking that the buffer holds exactly
    `prod(shape)` length-prefixed elements."""
    count = element_count(shape)
    items: list[bytes] = []
    offset, end = 0, len(buffer)
    view = memoryview(buffer)
    for index in range(count):
        if offset + 4 > end:
            raise InvalidInput(
                f"input {name!r}: BYTES data holds {index} elements, shape {list(shape)} "
                f"needs {count}"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"input {name!r}: BYTES element {index} claims {length} bytes, "
                f"only {end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != end:
        raise InvalidInput(
            f"input {name!r}: {end - offset} bytes left over after {count} BYTES elements "
            f"of shape {list(shape)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def decode_raw(name: str, dtype: Datatype, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Raw tensor bytes -> array; zero-copy (a read-only view on `raw`) for fixed-size types."""
    if dtype is BYTES:
        return deserialize_bytes(raw, shape, name)
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: raw data has {len(raw)} bytes, but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def decode_contents(
    name: str, dtype: Datatype, shape: Sequence[int], contents: object
) -> np.ndarray:
    """Typed `InferTensorContents` -> array, checking the element count against the shape."""
    if dtype.contents_field is None:
        raise InvalidInput(
            f"input {name!r}: {dtype.name} tensors travel only as raw_input_contents"
        )
    values = getattr(contents, dtype.contents_field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {dtype.contents_field} has {len(values)} elements, "
            f"shape {list(shape)} needs {count}"
        )
    if dtype is BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.asarray(values, dtype=dtype.numpy).reshape(shape)
    except OverflowError as exc:
        raise InvalidInput(f"input {name!r}: value out of range for {dtype.name}: {exc}") from None


def encode_raw(array: np.ndarray) -> tuple[Datatype, bytes]:
    """Array -> (datatype, raw little-endian row-major bytes)."""
    dtype = datatype_of(array)
    if dtype is BYTES:
        return dtype, serialize_bytes(array)
    if array.dtype != dtype.numpy or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=dtype.numpy)
    return dtype, array.tobytes()


def validate_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return dims


def decode_inputs(request: object) -> dict[str, np.ndarray]:
    """A v2 `ModelInferRequest` -> {input name: array}, checking the wire format only
    (the model's own expectations are checked by the DataPlane)."""
    tensors = request.inputs  # type: ignore[attr-defined]
    raws = request.raw_input_contents  # type: ignore[attr-defined]
    if raws and len(raws) != len(tensors):
        raise InvalidInput(
            f"request has {len(tensors)} inputs but {len(raws)} raw_input_contents; "
            "raw data must be given for every input, in input order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears more than once in the request")
        dtype = datatype(tensor.datatype)
        shape = validate_shape(name, tensor.shape)
        if raws:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r} has typed contents, but the request also uses "
                    "raw_input_contents; use one or the other for all inputs"
                )
            arrays[name] = decode_raw(name, dtype, shape, raws[index])
        else:
            arrays[name] = decode_contents(name, dtype, shape, tensor.contents)
    return arrays


def encode_outputs(response: object, outputs: Mapping[str, np.ndarray]) -> None:
    """Append `outputs` to a v2 `ModelInferResponse` as raw tensors, in mapping order."""
    tensors = response.outputs  # type: ignore[attr-defined]
    raws = response.raw_output_contents  # type: ignore[attr-defined]
    for name, array in outputs.items():
        dtype, raw = encode_raw(array)
        tensors.add(name=name, datatype=dtype.name, shape=array.shape)
        raws.append(raw)


# -- JSON tensors (the v2 REST protocol's `data`) ------------------------------------

# JSON value kinds (numpy's, as `np.array` infers them from JSON) each datatype accepts:
# integers never take floats (1.5 would silently become 1), BOOL only takes true/false.
_JSON_KINDS: Mapping[str, str] = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_JSON_KIND_NAMES: Mapping[str, str] = {"b": "true/false", "iu": "integers", "iuf": "numbers"}


def decode_json_data(name: str, dtype: Datatype, shape: Sequence[int], data: object) -> np.ndarray:
    """A REST tensor's JSON `data` (row-major, flat or nested) -> array, checking the
    element count against `shape` and that the values fit `dtype` (BYTES: strings)."""
    if not isinstance(data, list):
        raise InvalidInput(
            f"input {name!r}: 'data' must be a JSON array, got {type(data).__name__}"
        )
    count = element_count(shape)
    if dtype is BYTES:
        flat = _flatten(data)
        if len(flat) != count:
            raise InvalidInput(
                f"input {name!r}: data has {len(flat)} elements, shape {list(shape)} needs {count}"
            )
        if not all(isinstance(item, str) for item in flat):
            raise InvalidInput(
                f"input {name!r}: BYTES data must be JSON strings (send other bytes as binary data)"
            )
        array = np.empty(count, dtype=object)
        array[:] = [item.encode("utf-8") for item in flat]
        return array.reshape(shape)
    try:
        values = np.array(data)
    except (ValueError, OverflowError):  # ragged nesting
        raise InvalidInput(f"input {name!r}: data is not a regular (non-ragged) array") from None
    if values.size != count:
        raise InvalidInput(
            f"input {name!r}: data has {values.size} elements, shape {list(shape)} needs {count}"
        )
    # bfloat16 (ml_dtypes) is numpy kind "V"; its JSON values are numbers like FP16's.
    accepted = _JSON_KINDS.get(dtype.numpy.kind, "iuf")
    # Integers beyond int64 (UINT64's upper half, or out of any range): numpy infers
    # float64 (losing digits) or keeps Python ints; converting to the datatype itself is
    # exact and checks the range.
    if (
        values.dtype.kind in "fO"
        and dtype.numpy.kind in "iu"
        and all(isinstance(v, int) and not isinstance(v, bool) for v in _flatten(data))
    ):
        try:
            return np.array(data, dtype=dtype.numpy).reshape(shape)
        except OverflowError:
            raise InvalidInput(
                f"input {name!r}: a value is out of range for {dtype.name}"
            ) from None
    if count and values.dtype.kind not in accepted:
        raise InvalidInput(
            f"input {name!r}: {dtype.name} data must be JSON {_JSON_KIND_NAMES[accepted]}, "
            f"got {_flatten(data)[0]!r}"
        )
    if count and dtype.numpy.kind in "iu":
        limits = np.iinfo(dtype.numpy)
        low, high = int(values.min()), int(values.max())
        if low < limits.min or high > limits.max:
            raise InvalidInput(
                f"input {name!r}: value {low if low < limits.min else high} is out of range "
                f"for {dtype.name} [{limits.min}, {limits.max}]"
            )
    return values.astype(dtype.numpy, copy=False).reshape(shape)


def encode_json_data(name: str, array: np.ndarray) -> list[object]:
    """Array -> the flat row-major list of a REST tensor's JSON `data` (BYTES as text)."""
    flat = array.reshape(-1)
    dtype = datatype_of(array)
    if dtype is BYTES:
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                "carry; request it with binary_data"
            ) from None
    if dtype.name == "BF16":  # ml_dtypes scalars are not JSON numbers
        flat = flat.astype(np.float32)
    return flat.tolist()


def _flatten(data: list[object]) -> list[object]:
    """Nested JSON arrays -> their elements in row-major order."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[object] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat
